"""Domain errors. The CLI turns every DeepSignsError into one line on stderr and exit 2.

Anything else that escapes a command is a bug: the CLI reports it with exit code 3, never
0 or 1, so that a pipeline cannot read a crash as a verdict.
"""

from __future__ import annotations

import re
import signal

__all__ = [
    "DeepSignsError",
    "InputError",
    "CheckpointError",
    "DataError",
    "BundleError",
    "SchemeError",
    "OnnxError",
    "OutputExistsError",
    "TrainingError",
    "one_line",
    "shown",
    "Interrupted",
    "USER_CODE_FAILURES",
    "user_failure",
]

#: what the user's own code (a --data or --arch factory, its module, its Dataset) may raise:
#: anything at all, a sys.exit() and a BaseException of its own included (a Rust library's
#: PanicException had ended a command with a traceback, exit 1), and each is the user's to fix,
#: not a bug of ours. Ctrl-C and the signals, a KeyboardInterrupt, are not: every `except` of
#: these re-raises one first
USER_CODE_FAILURES = BaseException


class DeepSignsError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""


class InputError(DeepSignsError):
    """A bad option value or combination."""


class CheckpointError(DeepSignsError):
    """A model file that cannot be read or does not fit its architecture."""


class DataError(DeepSignsError):
    """A data set that cannot be read or does not fit the model."""


class BundleError(DeepSignsError):
    """A key bundle that cannot be opened, or a wrong passphrase."""


class SchemeError(DeepSignsError):
    """Watermark keys that cannot be made or used as asked."""


class NotLearnt(SchemeError):
    """An embedding that did not take in the epochs it ran: `what` happened, `remedy` is the
    advice for the command that ran it (a command that runs the embedding itself, as
    `attack overwrite` does, gives its own)."""

    def __init__(self, what: str, remedy: str):
        super().__init__(f"{what}: {remedy}")
        self.what = what


class NotForScheme(SchemeError):
    """An output that holds nothing the scheme reads (labels, where it reads scores): no
    reading, and nothing missed."""


class OnnxError(DeepSignsError):
    """An ONNX file that is malformed, unsafe, or does not fit the keys."""


class OnnxUnread(OnnxError):
    """One reading of an ONNX model that could not be taken (the model stays usable, and the
    readings that could be taken stand)."""


class OnnxTooMuch(OnnxUnread):
    """An ONNX model whose answer to one query is more data than deepsigns reads."""


class OutputExistsError(DeepSignsError):
    """An output path exists and --force was not given."""


class TrainingError(DeepSignsError):
    """Training diverged (a non-finite loss): the learning rate or the data are at fault."""


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# what a terminal takes for an instruction, not a character: C0 and C1 controls (ESC, and CSI
# \x9b alone, start escape sequences) and the bidirectional overrides that reorder a line
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def _escaped(match: re.Match) -> str:
    """A control character as Python writes it; a byte of a name that is not UTF-8 (a lone
    surrogate, as Python decodes such a name) as that byte: \\xff."""
    char = match.group()
    return f"\\x{ord(char) - 0xdc00:02x}" if "\udc80" <= char <= "\udcff" else repr(char)[1:-1]


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` as valid Unicode, for JSON that any parser takes: a byte of a file name that is
    not UTF-8 (a lone surrogate, as Python decodes such a name) written out as that byte,
    \\xff, as the human reports show it; every other character as it is."""
    return _SURROGATE.sub(_escaped, text)


def one_line(text: object, limit: int = 200) -> str:
    """A foreign message (torch, onnxruntime, numpy) fit to quote inside ours: its first
    non-empty line, colours stripped, control characters escaped, at most `limit` characters.
    A C++ stack dump below the first line is dropped."""
    text = _ANSI.sub("", str(text))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = _CONTROL.sub(_escaped, first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


# how running out of memory reads where a library reports it: Python's MemoryError aside, a
# C++ allocation (std::bad_alloc), torch's allocators (CPU, CUDA), a shared library's segments
# that could not be mapped at import (under ulimit -v)
_OUT_OF_MEMORY = ("bad_alloc", "can't allocate memory", "cannot allocate memory", "out of memory",
                  "failed to map segment")


def out_of_memory(exc: BaseException, text: str | None = None) -> bool:
    """Whether `exc` (or `text`, what it says) is the machine running out of memory."""
    said = (str(exc) if text is None else text).lower()
    return isinstance(exc, MemoryError) or any(sign in said for sign in _OUT_OF_MEMORY)


def load_factory(spec: str, flag: str, what: str, error: type[DeepSignsError]):
    """The object that `package.module:name` (`flag`'s value) names; importing runs the user's
    module. `error` with one line when it cannot be loaded; stdout sent into the module's file
    is refused, as into any file a command reads."""
    import importlib

    from .fileio import refuse_the_report_file

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:  # (importing runs the module's code)
        raise error(f"cannot load {what} '{spec}' ({user_failure(exc)}): check that the module is importable "
                    "(on PYTHONPATH) and defines that factory") from None
    refuse_the_report_file(getattr(module, "__file__", None) or "", f"the module of {flag} {shown(spec)}")
    return factory


def user_failure(exc: BaseException) -> str:
    """How the user's own code failed (one of USER_CODE_FAILURES), to quote in our message.
    Its message is the user's code too, and may fail in turn: then its type alone."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({user_text(exc.code, 60, repr)})"
    text = user_text(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def user_text(value: object, limit: int = 200, show=str) -> str:
    """`one_line(show(value))` of an object of the user's (an exception, what it exited with),
    whose __str__ or __repr__ may itself fail: then its type, said to be unprintable."""
    try:
        return one_line(show(value), limit)
    except Exception:  # (the user's own __str__, whatever it raised)
        return f"<a {type(value).__name__} that cannot be printed>"


def shown(path: object) -> str:
    """A path as it can be printed on one line: control characters (a newline in a file name)
    are escaped, so that a message about the file stays one line."""
    text = str(path)
    return _CONTROL.sub(_escaped, text)


#: the signals that stop a command (Ctrl-C, `kill`, a closed terminal, Ctrl-\; the CPU-time limit's
#: warning, ulimit -t, and the two a batch scheduler sends before it kills a job, SIGUSR1 and SIGUSR2,
#: each of which had ended a command as its default does: no line, its .part files left), each
#: reported as `Interrupted`: held during a commit (fileio), and SIGINT aside (Python's
#: KeyboardInterrupt) handled by the CLI
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU, signal.SIGUSR1,
                signal.SIGUSR2)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM, SIGHUP or SIGQUIT (Ctrl-\\). `written` lists the outputs that were complete
    when it came (the signal was held until a group of outputs had been committed), else nothing
    was written."""

    def __init__(self, signum: int = 2, written: tuple[str, ...] = ()):
        super().__init__(signum)
        self.signum, self.written = signum, tuple(written)
