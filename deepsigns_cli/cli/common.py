"""What every command shares: options, the error contract, passphrases, JSON and progress.

The error contract: a domain error (bad input) is one line on stderr and exit 2; Ctrl-C or
SIGTERM is one line and exit 128 + the signal; anything else is a bug, one line and exit 3
(the traceback with --debug or DEEPSIGNS_DEBUG=1), so that a pipeline never reads a crash as
a verdict (0 detected, 1 not detected).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import math
import os
import re
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import click

from ..api import LIMITS, held_after_commit, refuse_the_report_file, report_to, to_nowhere
from ..errors import DeepSignsError, InputError, Interrupted, one_line, out_of_memory, shown

EXIT_OK, EXIT_NOT_DETECTED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process that a closed pipe stopped
PASSPHRASE_ENV = "DEEPSIGNS_PASSPHRASE"
DEBUG_ENV = "DEEPSIGNS_DEBUG"
#: set by `--nproc` for its processes: their error lines start with it, so that the launcher
#: tells them from what a --data or --arch factory prints (a line of its own "error: ...")
ERROR_TAG_ENV = "DEEPSIGNS_ERROR_TAG"


_UNSET = object()


class State:
    quiet = False
    debug = False
    report = _UNSET  # where the report goes while a command runs (report_stream)
    process = False  # the command is the process's own (main()): it ends when the command does


def report_stream():
    """stdout as the command found it: the report's alone. While a command runs, anything else
    printed to stdout (a --data or --arch factory's print(), a library's) goes to stderr, so
    that it cannot break a --json report (`handle_errors`). None: stdout was closed."""
    return sys.stdout if State.report is _UNSET else State.report


@contextmanager
def report_alone():
    """The stream the report goes to: stdout as the command found it, which nothing else writes
    to while the command runs. Python's prints go to stderr (`handle_errors`); so do the bytes
    written to file descriptor 1 itself (a program a --data factory runs, a C library's printf),
    which the process's stdout file points to stderr for the while, the report going to a copy
    of it. Where sys.stdout is not descriptor 1 (click's test runner, a caller's redirection),
    the stream as it is."""
    stream = sys.stdout
    try:  # (a copy numbered 3 or above: with stderr closed, os.dup would give 2; not inherited)
        stream.flush()
        saved = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3) if stream.fileno() == 1 else None
    except (OSError, ValueError, AttributeError):  # (stdout closed or None; io.UnsupportedOperation)
        saved = None
    if saved is None:
        yield stream
        return
    try:
        os.dup2(2, 1)
    except OSError:  # stderr closed: what would go there goes nowhere
        to_nowhere(1)
    report = open(saved, "w", encoding=stream.encoding, errors=stream.errors)  # (closed below)
    report_to(saved)
    try:
        yield report
    finally:
        report_to(None)
        try:  # (what went to stderr through sys.stdout, before stdout is its own again)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(report.fileno(), 1)
        # the report was flushed where it was written (`_to_report`); what is left of one cut
        # short (a signal while a full pipe held it) goes nowhere: a flush would block again
        to_nowhere(report.fileno())
        report.close()


def debugging() -> bool:
    return State.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _console(**kwargs):
    """A rich Console whose output, closed, raises BrokenPipeError: rich's own answer to a
    closed pipe is exit 1, which a pipeline reads as "not detected"."""
    from rich.console import Console

    class Closable(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(32, "Broken pipe")

    console = Closable(**kwargs)
    console.width = max(console.width, _LEAST_WIDTH)  # (COLUMNS=5 drew tables of empty cells)
    return console


_LEAST_WIDTH = 60  # columns a report is drawn in, however narrow the terminal says it is


def stderr_console():
    return _console(stderr=True, quiet=State.quiet)


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """One line on stderr (a newline inside the message cannot split it), then exit with
    `code` even where stderr cannot be written (a full disk): the code must not be lost."""
    try:
        tag = os.environ.get(ERROR_TAG_ENV, "") if "RANK" in os.environ else ""  # (a process of a run)
        click.echo(f"{tag}error: {shown(message)}", err=True)
    except OSError:
        pass
    sys.exit(code)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised in the handling of, or from (at most 16)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 16 and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _machine_limit(exc: BaseException) -> str | None:
    """The limit of the machine that `exc` met inside a library, in words (memory, ulimit -v;
    open files, ulimit -n); None when it is not one. Neither is a bug of ours: they had been
    reported as one, exit 3."""
    if any(out_of_memory(e) for e in _chain(exc)):  # (a library's own error, raised as memory ran out)
        return "not enough memory: free some, or raise the limit (ulimit -v), then run the command again"
    if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE) or "too many open files" in str(exc).lower():
        return "too many open files: raise the limit (ulimit -n), then run the command again"
    return None


def torch_places() -> list[str]:
    """The folders of the torch package, found without importing it (none: torch is not found)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or ()) if spec is not None else []


def _torch_not_loaded(exc: BaseException) -> str | None:
    """What to say of `exc` when it came while Python loaded one of torch's modules (a value of
    an environment variable torch reads at import that it refuses: TORCH_LOGS=garbage had been
    reported as a bug of ours, exit 3); None otherwise."""
    places = [os.path.join(p, "") for p in torch_places()]
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "<module>" and any(code.co_filename.startswith(p) for p in places):
            named = sorted(k for k in os.environ if k.startswith(("TORCH", "PYTORCH")))
            return (f"torch could not be loaded ({type(exc).__name__}: {one_line(exc, 240)}): "
                    + (f"correct or unset the variable it refuses ({', '.join(named)} set here)" if named else
                       "check the torch installation"))
        tb = tb.tb_next
    return None


def internal_error(exc: BaseException):
    if debugging():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    limit = _machine_limit(exc)  # (first: memory that runs out while torch loads is told as such)
    if limit is not None:
        said = one_line(exc, 120)
        fail(f"{limit} ({type(exc).__name__}{': ' + said if said else ''})", EXIT_BAD_INPUT)
    not_loaded = _torch_not_loaded(exc)
    if not_loaded is not None:
        fail(not_loaded, EXIT_BAD_INPUT)
    fail(f"internal error, a bug in deepsigns, not in your input ({type(exc).__name__}: "
         f"{one_line(exc)}): rerun with --debug (or {DEBUG_ENV}=1) for the traceback and report it",
         EXIT_INTERNAL)


def interrupted(exc: KeyboardInterrupt):
    signum = exc.signum if isinstance(exc, Interrupted) else 2
    written = exc.written if isinstance(exc, Interrupted) else ()
    if written:
        fail(f"interrupted after every output was written ({', '.join(written)}): they are complete",
             128 + signum)
    fail("interrupted: no output was written; run the command again", 128 + signum)


def handle_errors(fn):
    """The error contract around a command's body."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            # a signal once the outputs are written is held until the report is printed, then
            # reported with them (it had cut the report short, saying that nothing was written)
            with report_alone() as State.report, held_after_commit(restore=not State.process) as late:
                _refuse_the_report_file_as_a_value()
                try:
                    with redirect_stdout(sys.stderr):
                        result = fn(*args, **kwargs)
                except SystemExit as exc:  # (a verdict, 0 or 1, is replaced; a failure is not)
                    if not late.came or exc.code not in (EXIT_OK, EXIT_NOT_DETECTED, None):
                        raise
                if late.came:
                    raise Interrupted(late.came[0], tuple(late.written))
                return result
        except DeepSignsError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            interrupted(exc)
        except (SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except BaseException as exc:  # the one place that catches everything: a bug, exit 3 (a library's
            # BaseException too: safetensors' PanicException had ended a save with a traceback, exit 1)
            internal_error(exc)
        finally:
            State.report = _UNSET
            forget_passphrases()

    return wrapper


# the options whose values are names or text, not files (--data names a file as an .npz alone)
_NOT_FILES = frozenset({"arch", "arch_kwargs", "schemes", "scheme", "message", "layer", "output_name", "commitment",
                        "commitments", "names", "sweep", "student"})  # (`--data digits > digits` is no clash)


def _refuse_the_report_file_as_a_value() -> None:
    """InputError when stdout was sent into a file that one of the command's values names (an
    input, `extract --model m.onnx >> m.onnx`, whose report was appended to the suspect model;
    an output; the bundle; under --nproc too, where the processes' stdout is a pipe)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return
    for param in ctx.command.params:
        if param.name in _NOT_FILES:
            continue
        flag = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        for value in _texts(ctx.params.get(param.name)):
            if param.name != "data_spec" or value.endswith(".npz"):  # (a folder's files: as they are listed)
                refuse_the_report_file(value, f"given as {flag}")


def _texts(value) -> list[str]:
    """The strings in a parameter's value (a tuple of them for a repeated option, of tuples for
    `dispute --party`)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (tuple, list)):
        return [text for item in value for text in _texts(item)]
    return []


# ------------------------------------------------------------------ shared options


class OnceGroup(click.Group):
    """A group whose commands refuse an option that takes one value, given twice (click keeps
    the last without a word: `--sweep sigma=0.1 --sweep sigma=0.2` swept 0.2 alone)."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, click.Group):
            _refuse_repeats(command, rest, click.Context(command, info_name=name, parent=ctx))
        return name, command, rest


def _refuse_repeats(command: click.Command, args: list[str], ctx: click.Context) -> None:
    options = [option for option in command.params if isinstance(option, click.Option)]
    takes = {name: option for option in options if not (option.is_flag or option.count) for name in option.opts}
    names = {name for option in options for name in (*option.opts, *option.secondary_opts)}
    names |= set(command.get_help_option_names(ctx))  # (-h and --help)
    seen, i = set(), 0
    while i < len(args) and args[i] != "--":
        name = args[i].split("=", 1)[0]
        option = takes.get(name)
        if option is not None:
            if not option.multiple:
                if option.name in seen:
                    raise click.UsageError(f"{name} is given twice: give it once", ctx=ctx)
                seen.add(option.name)
            if "=" not in args[i]:  # (its values are the next words, whatever they look like)
                given = args[i + 1: i + 1 + option.nargs]
                clash = next((word for word in given if word.split("=", 1)[0] in names), None)
                if clash is not None:  # (`--out --force`: a value forgotten)
                    raise click.UsageError(f"{name} takes a value, and the next word is the option {clash}: give "
                                           f"{name} its value (one that starts with '-' as {name}=VALUE)", ctx=ctx)
                i += option.nargs
        i += 1


def common_options(fn=None, *, random: bool = True, fresh: bool = False):
    """--json, --quiet, --seed, --debug: on every command. `random=False`: a command that draws
    nothing at random, whose --seed is taken (the same flags everywhere) and says it changes nothing.
    `fresh`: without --seed, the command draws fresh randomness (keygen), not seed 0."""
    if fn is None:
        return functools.partial(common_options, random=random, fresh=fresh)

    def set_state(name):
        def callback(ctx, param, value):
            if value:
                setattr(State, name, True)
            return value

        return callback

    fn = click.option("--json", "json_", is_flag=True, help="Print one JSON object on stdout.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, callback=set_state("quiet"), expose_value=False,
                      is_eager=True, help="Silence progress and warnings on stderr.")(fn)
    fn = click.option("--debug", is_flag=True, callback=set_state("debug"), expose_value=False,
                      is_eager=True, help=f"Show the traceback of an internal error (or {DEBUG_ENV}=1).")(fn)
    seed_help = ("Changes nothing here: this command draws nothing at random (taken as on every command)."
                 if not random else "Seed for reproducible keys (default: fresh randomness)." if fresh else
                 "Seed for a reproducible run (default 0).")
    fn = click.option("--seed", type=int_range("seed"), default=None, help=seed_help)(fn)
    return handle_errors(fn)


def registry_option(option, help_prefix: str = ""):
    """The click option of a registry row's Option (a scheme's or an attack's); the api checks
    every value again (NaN included), click gives the ranges in --help."""
    if option.kind == "flag":
        return click.option(option.flag, option.key, is_flag=True, default=False,
                            help=f"{help_prefix}{option.help}")
    if option.kind == "choice":
        kind = click.Choice(option.choices)
    else:
        kind = {"int": int, "float": Number(), "str": str}[option.kind]
    if option.kind == "int":
        kind = Whole(*(None if bound is None else int(bound) for bound in (option.low, option.high)))
    return click.option(option.flag, option.key, type=kind, default=None,
                        help=f"{help_prefix}{option.help}")


# numbers as a user types them: int() and float() (so click) also take '1_0' as 10 and other
# scripts' digits ('\u0661\u0662' as 12)
WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*")
DECIMAL = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


class Whole(click.IntRange):
    """A whole number in the digits 0-9, within [min, max] where given."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not WHOLE.fullmatch(value):
            self.fail(f"{value!r} is not a whole number written in the digits 0-9", param, ctx)
        return super().convert(value, param, ctx)

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()  # (not "[x<=None]")


class Number(click.types.FloatParamType):
    """A decimal number in the digits 0-9 (an exponent allowed: 1e-9); the api checks its range."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not DECIMAL.fullmatch(value):
            self.fail(f"{value!r} is not a number written in the digits 0-9", param, ctx)
        number = super().convert(value, param, ctx)
        mantissa = re.split("[eE]", value)[0] if isinstance(value, str) else ""
        if math.isinf(number) or number == 0 and re.search("[1-9]", mantissa):
            # (1e-400 had been read as 0.0 and refused as "got 0.0", a number never typed)
            self.fail(f"{str(value).strip()!r} is too {'large' if math.isinf(number) else 'small'} a number to hold "
                      "(a float's range is about 1e-308 to 1e308)", param, ctx)
        return number


def int_range(name: str) -> Whole:
    return Whole(*LIMITS[name])


def batch_size_option(fn, *, parallel: bool = True):
    """--batch-size; `parallel`: the command runs under --nproc and torchrun too."""
    shared = " (under --nproc / torchrun: in all, shared among the processes)" if parallel else ""
    return click.option("--batch-size", type=int_range("batch_size"), default=64, show_default=True,
                        help=f"Samples per step{shared}.")(fn)


def device_option(fn):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="auto = CUDA when torch sees a GPU.")(fn)


def provider_option(fn):
    return click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True,
                        help="onnxruntime provider (auto = CUDA when really usable).")(fn)


def timeout_option(fn):
    from ..api import DEFAULT_TIMEOUT

    return click.option("--timeout", type=Number(), default=DEFAULT_TIMEOUT, show_default=True,
                        help="Seconds a suspect model may take to answer, all its queries together "
                             "(each further set of a wide graph's units that extract reads runs the graph "
                             "again, with as long again; see the README).")(fn)


def queries_option(fn):
    return click.option("--queries", type=Whole(), default=None, metavar="N",
                        help="Most queries a GradSigns reading from ONNX scores may make per suspect "
                             "(default 1000); more queries, more margin.")(fn)


def force_option(fn):
    return click.option("--force", is_flag=True, help="Replace existing outputs.")(fn)


def arch_options(fn):
    fn = click.option("--arch-kwargs", default=None,
                      help="JSON keyword arguments of --arch, e.g. '{\"hidden\": [256, 256]}'.")(fn)
    return click.option("--arch", default=None,
                        help="Architecture of a .pt/.pth state dict (or of a checkpoint whose "
                             "own is not built in): mlp, cnn, resnet or module:factory.")(fn)


def model_option(fn, help="Model: .safetensors checkpoint (or .pt with --arch)."):
    return click.option("--model", "model_path", required=True, help=help)(arch_options(fn))


DATA_HELP = ("'digits', an .npz (x_train, y_train, x_test, y_test, or x, y), an image folder "
             "(DIR/train/<class>/*.png|jpg|jpeg and DIR/test/<class>/*) or package.module:factory "
             "(returning two torch Datasets, train and test).")


def data_option(fn=None, *, default: str | None = "digits", help: str = DATA_HELP):
    """--data and --image-size. The command receives `data_spec`: the --data string, or with
    --image-size the api's DataSpec carrying both."""
    if fn is None:
        return functools.partial(data_option, default=default, help=help)

    @functools.wraps(fn)
    def with_spec(*args, data_spec, image_size, **kwargs):
        if data_spec is not None and not data_spec.strip():
            raise click.UsageError("--data is empty: give 'digits', an .npz, an image folder or package.module:factory")
        if image_size is not None:
            if data_spec is None:
                raise click.UsageError("--image-size goes with --data, an image folder: give both, or leave "
                                       "--image-size out")
            from .. import api

            data_spec = api.data_spec(data_spec, image_size=image_size)
        return fn(*args, data_spec=data_spec, **kwargs)

    with_spec = click.option(
        "--image-size", type=int_range("image_size"), default=None, metavar="N",
        help="An image folder's images are resized to N x N (default: the size of the first training "
             "image, which must be square). A checkpoint trained on a folder keeps its own.")(with_spec)
    return click.option("--data", "data_spec", default=default, show_default=default is not None,
                        help=help)(with_spec)


def keys_option(fn):
    fn = click.option("--passphrase-file", type=str, default=None,
                      help=f"File holding the passphrase (else ${PASSPHRASE_ENV}, else a prompt).")(fn)
    return click.option("--keys", "keys_path", required=True, help="The sealed key bundle (.dskey).")(fn)


def commitment_option(fn):
    return click.option("--commitment", default=None, metavar="SHA256",
                        help="The bundle's published commitment (SHA-256): any other bundle is "
                             "refused.")(fn)


def output_option(fn):
    return click.option("--output", "output_name", default=None, metavar="NAME",
                        help="ONNX output to read (default: every output it can, the best kept, each "
                             "counted in p).")(fn)


def alpha_option(fn):
    from ..api import DEFAULT_ALPHA

    return click.option("--alpha", type=Number(), default=DEFAULT_ALPHA, show_default=True,
                        help="Significance: detected when p-value <= alpha.")(fn)


def parse_arch_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise InputError(f"--arch-kwargs is not JSON ({msg}): e.g. '{{\"hidden\": [256, 256]}}'") from None
    if not isinstance(value, dict):
        raise InputError("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": [256, 256]}'")
    return value


# ------------------------------------------------------------------ passphrases


MAX_PASSPHRASE_BYTES = 1 << 16  # a passphrase file holds a line or a few, not gigabytes
PIPE_WAIT_SECONDS = 10  # what a pipe (`<(pass show key)`) is given to write the passphrase and close

_READ: dict[str, str] = {}  # the passphrase files the running command has read: a pipe can be read once


def passphrase_from(passphrase_file: str | None, *, confirm: bool = False, option: str = "--passphrase-file"):
    """The passphrase, resolved when the api asks (after its cheap checks have passed)."""
    return lambda: get_passphrase(passphrase_file, confirm=confirm, option=option)


def asks_passphrase(passphrase_file: str | None) -> bool:
    """Whether `get_passphrase` would ask at the terminal: no file, no variable, stdin a terminal."""
    return (passphrase_file is None and not os.environ.get(PASSPHRASE_ENV)
            and sys.stdin is not None and sys.stdin.isatty())  # (stdin closed: Python gives None)


def get_passphrase(passphrase_file: str | None, *, confirm: bool = False, option: str = "--passphrase-file") -> str:
    """From the file (a regular file or a pipe, read once per command), else the variable, else
    a prompt at the terminal. The trailing line ending of a file or of the variable is no part of
    the passphrase (`api.AsGiven` opens a bundle sealed with the variable's)."""
    if passphrase_file == "":  # (an unset variable: not "no file", which would fall back on the environment)
        raise InputError(f"{option} is empty: name the file that holds the passphrase")
    if passphrase_file:
        if passphrase_file not in _READ:
            _READ[passphrase_file] = _read_passphrase_file(Path(passphrase_file), option)
        return _READ[passphrase_file]
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        try:  # (bytes that are not UTF-8 reach us as surrogates, which no key can be derived from)
            env.encode("utf-8")
        except UnicodeEncodeError:
            try:  # (in the C locale, with PYTHONUTF8=0, Python reads even UTF-8 as such: its bytes decide)
                env = os.fsencode(env).decode("utf-8")
            except UnicodeError:
                raise InputError(f"{PASSPHRASE_ENV} is not UTF-8 text: set it to the passphrase as text, or pass "
                                 f"{option}") from None
        text = env.rstrip("\r\n")  # (as a file's: $'pw\n' in the variable and pw\n in a file are one passphrase)
        if not text:
            raise InputError(f"{PASSPHRASE_ENV} holds only a line ending: set it to the passphrase")
        if text == env:
            return text
        from ..api import AsGiven

        return AsGiven(text, env)
    if asks_passphrase(None):
        return _prompt(confirm)
    raise InputError(f"no passphrase: set {PASSPHRASE_ENV} or pass {option}")


def _prompt(confirm: bool) -> str:
    """The passphrase, typed at the terminal, with the progress bar off meanwhile (it had redrawn
    itself over the prompt ten times a second: an empty line, and a command that seemed to
    hang). Ctrl-C or Ctrl-D there interrupts the command (it had been an internal error)."""
    bar = _BARS[-1] if _BARS else None
    if bar is not None:
        bar.stop()
    try:
        return click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    except click.exceptions.Abort:
        raise KeyboardInterrupt from None
    finally:
        if bar is not None:
            bar.start()


def forget_passphrases() -> None:
    """The command has ended: the passphrase files it read are read again by the next one."""
    _READ.clear()


def _read_passphrase_file(path: Path, option: str) -> str:
    import stat

    try:
        try:
            kind = os.stat(path).st_mode
        except FileNotFoundError:
            # (the name given is not repeated: a passphrase typed where its file's name belongs
            # would have been printed, into a CI log)
            raise InputError(f"the passphrase file that {option} names is not found (the name is not shown, in "
                             f"case it is the passphrase itself): check {option}") from None
        if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):  # (opened, a device could block or never end)
            raise InputError(f"passphrase file {shown(path)} is not a regular file nor a pipe (a folder, a device "
                             f"or a socket): check {option}")
        # never blocks: a FIFO that nothing writes to is waited for a bounded time (`_drain`)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                data = _drain(fd, path, option)
            else:
                with os.fdopen(os.dup(fd), "rb") as f:  # (at most a little more than any passphrase file holds)
                    data = f.read(MAX_PASSPHRASE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_PASSPHRASE_BYTES:
            raise InputError(f"passphrase file {shown(path)} holds more than {MAX_PASSPHRASE_BYTES >> 10} KiB: "
                             f"it is not a passphrase file; check {option}")
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"passphrase file {shown(path)} is not UTF-8 text: write the passphrase "
                         "into it as text") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read passphrase file {shown(path)} ({one_line(exc)}): check "
                         f"{option}") from None
    if not text:
        raise InputError(f"passphrase file {shown(path)} is empty: write the passphrase into it")
    return text


def _drain(fd: int, path: Path, option: str) -> bytes:
    """A pipe's bytes up to its end (every writer gone), waiting at most PIPE_WAIT_SECONDS in
    all: a FIFO that nothing writes to, or a writer that never ends, is refused, never waited
    for forever. (Before a writer opens the FIFO a read gives b"" as at the end: the end is the
    one that follows some bytes.)"""
    import select
    import time

    data = bytearray()
    deadline = time.monotonic() + PIPE_WAIT_SECONDS
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    while len(data) <= MAX_PASSPHRASE_BYTES:
        try:
            chunk = os.read(fd, MAX_PASSPHRASE_BYTES + 1 - len(data))
        except BlockingIOError:  # a writer is there, nothing more yet
            chunk = None
        if chunk:
            data += chunk
            continue
        if chunk == b"" and data:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            if data:
                raise InputError(f"passphrase pipe {shown(path)} was not closed within {PIPE_WAIT_SECONDS} s: what "
                                 f"writes the passphrase into it must end; check {option}")
            raise InputError(f"no passphrase came through {shown(path)} within {PIPE_WAIT_SECONDS} s (a FIFO that "
                             f"nothing writes to?): check {option}")
        if chunk is None:  # (capped: a writer's end wakes no poll on Linux, when it was there before our open)
            poll.poll(min(left, 0.1) * 1000)
        else:  # (no writer yet, or one that ended without a byte: a poll would not wait)
            time.sleep(min(left, 0.05))
    return bytes(data)


# ------------------------------------------------------------------ output


def emit(report, json_: bool, render) -> None:
    """JSON on stdout for machines (always valid JSON), or a rich rendering for people. The
    report's warnings (keygen's, embed's, export's) go to stderr first; --json keeps them."""
    from ..api import report_json

    for warning in getattr(report, "warnings", ()):
        warn(warning)

    def write(stream) -> None:
        if json_:
            click.echo(json.dumps(report_json(report), indent=2, allow_nan=False), file=stream)
        else:
            render(_console(file=stream), report)

    _to_report(write)


def relay_report(text: str) -> None:
    """Print a report that another process made (--nproc: the first process's)."""
    _to_report(lambda stream: stream.write(text))


def _to_report(write) -> None:
    stream = report_stream()
    try:
        if stream is None:  # (started with stdout closed: Python gives None)
            raise BrokenPipeError(32, "stdout is closed")
        write(stream)
        stream.flush()
    except OSError as exc:  # never exit 0 or 1 when the report is lost: those read as a verdict
        stdout_failed(exc, "the report", "; any file the command wrote is complete")


def end_now(code) -> None:
    """End this process with `code` (as sys.exit takes it) once its work is done: the exit
    functions run (the loader processes' and the ONNX workers' stops, logging's last flush) and
    the streams are flushed, Python's and C's, but Python does not tear its modules down. With
    torch loaded that teardown took every command 0.5-0.8 s here (`python -c "import torch"`:
    2.0-2.3 s, 1.4-1.5 s ended so), and it waited for ever for a thread that the user's code left
    running (not a daemon, as a data library's prefetcher), deaf to signals (ignored once a
    command has ended). Every thread of ours is a daemon."""
    import atexit
    import contextlib

    if not isinstance(code, int):  # (as Python ends on such a code: printed, exit 1)
        if code is not None:
            with contextlib.suppress(Exception):
                print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # (what a library printed through C's stdio)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(code)


def stdout_failed(exc: OSError, what: str, written: str = "") -> None:
    """Exit for `what` that stdout did not take: 141 when it was closed (its reader gone), 2
    otherwise (a full disk); `written` says what stands of the command's work."""
    stream = report_stream()
    if stream is not None:  # (Python's last flush at exit would fail again)
        to_nowhere(stream.fileno())
    if isinstance(exc, BrokenPipeError):
        fail(f"stdout was closed before {what} was printed{written}: keep the reader open, or send {what} "
             "to a file", EXIT_BROKEN_PIPE)
    fail(f"cannot print {what} on stdout ({exc.strerror or exc}){written}: send {what} somewhere it can be "
         "written")


def emit_decision(report, json_: bool, render) -> None:
    """Print a detection report; exit 0 when detected, 1 when not: the contract a release
    pipeline reads. A scheme's warning (keys too few to reach alpha) goes to stderr; --json
    keeps it in the report too."""
    _warn_results([report])
    emit(report, json_, render)
    sys.exit(EXIT_OK if report.detected else EXIT_NOT_DETECTED)


def _warn_results(decisions) -> None:
    """Each scheme's warning (keys too few to reach alpha: the keys', so the same for every
    suspect) once, on stderr; --json keeps them in the report too."""
    said = dict.fromkeys(f"{result.scheme}: {result.warning}" for decision in decisions
                         for result in decision.results if getattr(result, "warning", None))
    for warning in said:
        warn(warning)


def emit_scan(report, json_: bool) -> None:
    """Print a scan (one row per suspect; each unreadable suspect also one line on stderr) and
    exit like grep: 2 when a suspect could not be read, else 0 when any is detected, else 1."""
    from . import render

    _warn_results([row.decision for row in report.rows if row.decision is not None])
    emit(report, json_, render.scan)
    for row in report.rows:
        if row.error is not None:  # (most messages name the file already)
            where = "" if shown(row.model) in row.error else f"{shown(row.model)}: "
            click.echo(f"error: {where}{shown(row.error)}", err=True)
    sys.exit(EXIT_BAD_INPUT if report.errors else EXIT_OK if report.detected else EXIT_NOT_DETECTED)


def read_suspects(command: str, models: tuple[str, ...], keys: str, passphrase, json_: bool, render_one,
                  **options) -> None:
    """`extract`/`verify`: one suspect file gives its full report; several, or a folder, a scan
    with the bundle opened once."""
    from .. import api

    if len(models) == 1 and not Path(models[0]).is_dir():
        read = api.extract if command == "extract" else api.verify
        emit_decision(read(models[0], keys, passphrase, **options), json_, render_one)
        return
    with progress_bar() as update:
        report = api.scan(command, list(models), keys, passphrase, **options, progress=update)
    emit_scan(report, json_)


def models_option(help: str):
    return click.option("--model", "models", required=True, multiple=True,
                        help=f"{help} Repeat it, or give a folder, to scan many with the bundle opened once.")


def warn(message: str) -> None:
    from .render import text

    stderr_console().print(f"[yellow]warning:[/] {text(message)}", highlight=False, soft_wrap=True)


_BARS: list = []  # the progress bars on the screen, the latest last


@contextmanager
def progress_bar():
    """A rich progress bar on stderr; yields the callback the library calls."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = stderr_console()
    # off when stderr is not a terminal: rich would only print a blank line there, which breaks
    # the one-line error contract and clutters CI logs
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=State.quiet or not console.is_terminal) as bar:
        _BARS.append(bar)  # (a passphrase prompt turns it off meanwhile)
        tasks: dict[str, int] = {}

        def update(done: int, total: int, description: str) -> None:
            key = description.split(" epoch")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(description, total=total)
            bar.update(tasks[key], completed=done, total=total, description=description)

        try:
            yield update
        finally:
            _BARS.remove(bar)
