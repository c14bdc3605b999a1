"""The `deepsigns` command group. Subcommands are imported only when used (fast --help)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import warnings

import click

from .. import __version__
from ..api import run_by_agent, signal_again
from ..errors import STOP_SIGNALS, Interrupted, one_line
from .common import (
    EXIT_BAD_INPUT,
    OnceGroup,
    State,
    end_now,
    fail,
    internal_error,
    interrupted,
    stdout_failed,
    torch_places,
)

COMMANDS = {
    "train": "Train a plain (unmarked) baseline model.",
    "keygen": "Create a sealed key bundle with fresh watermark secrets.",
    "embed": "Embed the bundle's watermarks by fine-tuning a model.",
    "export": "Export a checkpoint to ONNX, checked for parity with torch.",
    "extract": "White-box: read the watermark from a checkpoint or ONNX file.",
    "verify": "Black-box: decide ownership from an ONNX model's answers alone.",
    "dispute": "Two parties claim one model: whose mark is in whose model, who marked first.",
    "attack": "Attack a model the way a thief would (noise, ...); write the attacked model.",
    "inspect": "Show the public facts of a checkpoint, bundle or ONNX file.",
}


PARALLEL = ("train", "embed")  # the commands that run data-parallel under torchrun

_STOPPING = threading.Event()  # set once SIGTERM (or SIGHUP, SIGQUIT) came


_HOME = os.getpid()  # the command's process: a process forked from it (a loader process not yet
# started as one) dies of SIGTERM or SIGHUP as it would have, unseen


def _terminate(signum, frame):
    if os.getpid() != _HOME:  # (the command's handler raised in it had printed "Process ...: Traceback")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _STOPPING.set()
    # the loader processes (--workers) got it too when it was sent to the process group (timeout,
    # kill -- -PGID): their deaths are no failure of theirs to report (torch's SIGCHLD handler
    # raises "DataLoader worker ... killed by signal" wherever the command then is)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGCHLD, _no_news)
    raise Interrupted(signum)  # SIGTERM, SIGHUP and SIGQUIT clean up like Ctrl-C: no partial output


def _no_news(signum, frame) -> None:
    """SIGCHLD while the command stops: nothing to do."""


def _unraisable(args) -> None:
    """An exception that Python cannot raise where it came (in a callback it runs around os.fork,
    a __del__, a weakref's callback) is printed and dropped. A signal's (Ctrl-C, SIGTERM, SIGHUP)
    raised there had been: a traceback, and the command went on (an attack sweep, which forks
    for every ONNX reading, until a second signal). The signal is sent again, and its handler
    raises where the command can stop: from a thread, a moment later (sent from here, its handler
    would run here, in the callback still)."""
    if isinstance(args.exc_value, KeyboardInterrupt):
        signal_again(getattr(args.exc_value, "signum", signal.SIGINT), 0.01)
    elif not _STOPPING.is_set():  # (while SIGTERM stops the command: what a __del__ met as it stopped)
        sys.__unraisablehook__(args)


def _thread_failed(args) -> None:
    """A thread's uncaught exception, printed as Python prints it, except while SIGTERM stops
    the command: then a thread of the loader's processes (multiprocessing's resource sharer,
    mid-handshake with a worker that was just stopped) dies of it, which is no news."""
    if not _STOPPING.is_set():
        threading.__excepthook__(args)


class LazyGroup(OnceGroup):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"deepsigns_cli.cli.{name}_cmd").command

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if name not in PARALLEL:  # (under torchrun, each process would run it: N reports, N files)
            from ..api import world_size
            from ..errors import InputError

            try:
                world = world_size()
            except InputError:  # (settings that are wrong: the command says so)
                world = 1
            if world > 1:
                raise click.UsageError(f"'{name}' runs in one process, and this is one of the {world} processes "
                                       f"of a torchrun run: only {' and '.join(PARALLEL)} run in several; run "
                                       f"'deepsigns {name}' without torchrun")
        return name, command, rest

    def format_commands(self, ctx, formatter):  # short help without importing every module
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, text in COMMANDS.items()])

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Every failure is one line: click's usage errors too (exit 2, not its three lines)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        State.quiet = State.debug = False
        if threading.current_thread() is threading.main_thread():
            global _HOME
            _HOME = os.getpid()
            # (SIGHUP: the terminal or the ssh link went; SIGQUIT: Ctrl-\, whose default, a core
            # dump, is not written (_no_core_dumps) and had left the outputs' .part files behind)
            for signum in STOP_SIGNALS:
                if signum != signal.SIGINT:  # (Python raises KeyboardInterrupt for it)
                    signal.signal(signum, _terminate)
            threading.excepthook = _thread_failed
            sys.unraisablehook = _unraisable
        with warnings.catch_warnings():
            # torch/numpy warnings are not ours to show: a report or one error line, nothing else
            warnings.simplefilter("ignore")
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.exceptions.Abort:  # Ctrl-C at a prompt or while parsing
                fail("interrupted: no output was written; run the command again", 130)
            except click.ClickException as exc:
                where = f"'{exc.ctx.command_path} --help'" if getattr(exc, "ctx", None) else "'deepsigns --help'"
                # (it had said only "Usage: deepsigns ..."; click before 8.2 prints the help instead)
                if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                    ctx = exc.ctx
                    names = ctx.command.list_commands(ctx) if ctx is not None and isinstance(ctx.command, click.Group) \
                        else list(COMMANDS)
                    path = ctx.command_path if ctx is not None else "deepsigns"
                    fail(f"no command given: {path} COMMAND, one of {', '.join(names)} (see {where})", EXIT_BAD_INPUT)
                fail(f"{one_line(exc.format_message(), 400)} (see {where})", EXIT_BAD_INPUT)
            except KeyboardInterrupt as exc:
                interrupted(exc)
            except SystemExit as exc:
                # click's own printing (--help, --version) into a pipe whose reader is gone: click
                # exits 1, which a pipeline reads as "not detected", having wrapped stdout to hush it
                if exc.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
                    stdout_failed(BrokenPipeError(32, "Broken pipe"), "the text")
                raise
            except click.exceptions.Exit:
                raise
            except OSError as exc:  # click's own printing (--help, --version) to a closed or full stdout
                stdout_failed(exc, "the text")
            except BaseException as exc:  # a bug outside any command (parsing, loading)
                internal_error(exc)
            if sys.stdout is None:  # (stdout closed at start: click printed --help or --version nowhere; a
                # command's report had already failed in emit)
                stdout_failed(BrokenPipeError(32, "stdout is closed"), "the text")
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deepsigns")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, p, v: setattr(State, "debug", True) if v else None,
              help="Show the traceback of an internal error (or DEEPSIGNS_DEBUG=1).")
def cli():
    """Watermark neural networks and prove ownership later.

    Exit codes: 0 success or watermark detected, 1 not detected, 2 bad input,
    3 internal error (a bug), 129/130/131/143/138/140/152 interrupted (SIGHUP, Ctrl-C, Ctrl-\\, SIGTERM,
    SIGUSR1, SIGUSR2, SIGXCPU), 141 stdout closed.
    """


def _no_core_dumps() -> None:
    """A core dump of this process would hold the passphrase, and the keys it opens, in clear
    (Ctrl-\\ with core dumps on had written one of 270 MB): none is written, by the core limit
    or, on Linux, whatever the system's core pattern (the process is not dumpable; a debugger
    of the same user cannot attach either)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


#: the least address space (ulimit -v) a command is started in: its libraries map about 1 GiB of it
#: as they load (`extract` 0.77 GiB at its peak, `export` 0.93 GiB, on the sample model)
MIN_ADDRESS_SPACE = 2 << 30


def _address_space() -> None:
    """Refuse an address space too small for the libraries: below it, OpenBLAS ended `extract`
    with exit 1 ("not detected", at 740-770 MB), libgomp ended `export` so (at 650 MB), and `train`
    spun inside torch's import, deaf to SIGTERM (at 600-640 MB): each a library's own end, out of
    reach of any handler. Under a limit above this one, numpy's BLAS runs on one thread, whose
    buffer is taken now: the threads OpenBLAS starts at its first large product each take one of
    their own, and a failure to map it ends the process with exit 1 too."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY or {"-h", "--help", "--version"} & set(sys.argv[1:]):
        return
    if limit < MIN_ADDRESS_SPACE:
        fail(f"the address space is limited to {limit >> 20} MiB (ulimit -v), and deepsigns needs at least "
             f"{MIN_ADDRESS_SPACE >> 20} MiB (torch alone maps about 1 GiB): raise the limit "
             f"(ulimit -v {MIN_ADDRESS_SPACE >> 10} or more), then run the command again", EXIT_BAD_INPUT)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy as np

    np.ones((256, 256)) @ np.ones((256, 256))


def _openmp_settings() -> None:
    """torch's OpenMP (libgomp) reads the OMP_* and GOMP_* variables as it loads, and a value it
    cannot read (OMP_NUM_THREADS=abc, OMP_DYNAMIC=yes) it names in a line of its own on stderr,
    "libgomp: Invalid value for environment variable ...", above the report, and goes on at its
    default. Loaded here first, what it says caught: such a value is one line and exit 2 (torch
    then finds the library loaded, and it says nothing again)."""
    if not any(name.startswith(("OMP_", "GOMP_")) for name in os.environ):
        return
    import ctypes
    import glob

    found = [f for place in torch_places() for f in sorted(glob.glob(os.path.join(place, "lib", "libgomp*.so*"))
                                                          + glob.glob(os.path.join(place + ".libs", "libgomp*.so*")))]
    if not found:
        return
    try:
        os.fstat(2)  # (stderr closed: nothing it says can be seen, and a pipe made now would be fd 2)
        read, write = os.pipe()  # (no descriptors left: the command says so where it needs them)
    except OSError:
        return
    try:
        saved = os.dup(2)
    except OSError:
        os.close(read)
        os.close(write)
        return
    try:
        os.dup2(write, 2)
        with contextlib.suppress(OSError):
            ctypes.CDLL(found[0])
    finally:
        os.dup2(saved, 2)
        for fd in (saved, write):
            os.close(fd)
    with os.fdopen(read, "rb") as said:  # (a few lines: the pipe held them all)
        text = said.read().decode("utf-8", "replace")
    bad = re.search(r"Invalid value for environment variable (\w+)", text)
    if bad:
        name = bad.group(1)
        fail(f"{name}={one_line(repr(os.environ.get(name, '')), 40)} is not a value OpenMP (torch's threads) can "
             f"read: correct it or unset {name}", EXIT_BAD_INPUT)
    if text.strip():
        sys.stderr.write(text)


# what torch's C++ logging takes as TORCH_CPP_LOG_LEVEL (any case; empty: its default); another
# value it named in a line of its own above the report, and went on at its default
_CPP_LOG_LEVELS = ("", "0", "1", "2", "3", "INFO", "WARNING", "ERROR", "FATAL")


def main():
    State.process = True  # (signals are ignored once the command has ended: teardown is not stopped)
    _no_core_dumps()
    try:
        os.getcwd()
    except FileNotFoundError:  # (torch's import then ended the process with "Intel oneMKL FATAL ERROR")
        fail("the current folder was removed: cd into a folder that exists, then run the command again",
             EXIT_BAD_INPUT)
    _address_space()
    _openmp_settings()
    level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    if level is not None and level.upper() not in _CPP_LOG_LEVELS:
        fail(f"TORCH_CPP_LOG_LEVEL={one_line(repr(level), 40)} is not a level torch's logging can read: set it to "
             "INFO, WARNING, ERROR or FATAL (or 0 to 3), or unset it", EXIT_BAD_INPUT)
    if level is None and os.environ.get("WORLD_SIZE", "1") not in ("", "1") and not run_by_agent():
        # a process of a run that no torchrun agent started (its variables set by hand, or left
        # over): torch's C++ log printed a stack dump at every failed try to reach the first
        # process, and as the first gave up; its failures are one line of ours
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        cli(prog_name="deepsigns")
    except SystemExit as exc:
        end_now(exc.code)


