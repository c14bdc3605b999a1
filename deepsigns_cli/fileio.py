"""Outputs that appear whole or not at all, committed as a group.

A command declares every output first (`Outputs.add`): each is checked at once (not an
input, not another output, replaced only with --force, its folder exists and can be
written: a temporary file is created there as the probe), so that a mistake costs no
training. The command then writes each temporary file, and leaving the `with` block renames
them into place, in the order they were added.

Failure modes, stated:
- an error, Ctrl-C, SIGTERM, SIGHUP or SIGQUIT before the commit removes every temporary file;
  every target is as it was;
- during the commit (renames in the targets' own folders, microseconds) those signals are held
  until the last rename, then reported as `errors.Interrupted` naming what was written; inside
  the CLI's `held_after_commit` they stay held until the command's report is printed;
- a rename that fails (a disk pulled mid-commit) leaves the earlier renames done, so callers
  add their most precious output first (embed: the key bundle, then the checkpoint, then ONNX);
  a new output's name that another command took meanwhile fails the commit before the first,
  as does a file the system will not let go (a folder now, immutable, another user's in a
  shared folder), which `add` also refuses before any work; a rename the system refuses all
  the same is one line naming the output and what was written before it;
- every temporary file is flushed to the disk (fsync) before the first rename and each folder
  after the last, so that a power cut leaves each target old or new, whole;
- a file updated in place (the key bundle) is locked from the moment it is added until the
  commit, so that two commands cannot both read it and lose one update;
- SIGKILL (or the kernel's out-of-memory killer) leaves a `.NAME.*.part` file behind, a
  process of a torchrun run other than the first its private scratch files in the temporary
  folder, and an attack sweep or a quantize attack its scratch folder there (model copies),
  nothing else. Each temporary file and scratch folder is locked (flock) by the process that
  made it for as long as it lives, so the next command that writes the same output, or makes a
  scratch file or folder, removes the ones no process holds (`_sweep`); the launcher of a
  `--nproc` run removes at once what its processes left when the run fails (`sweep_run`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import STOP_SIGNALS, DeepSignsError, InputError, Interrupted, OutputExistsError, one_line, shown

__all__ = ["Outputs", "MODEL_SUFFIXES", "check_output", "require_file", "held_signals", "held_after_commit",
           "outputs_written", "not_final", "scratch_folder", "sweep_run", "sha256_file", "is_main_process", "run_place",
           "folder_kept", "current_folder", "back_to", "run_by_agent"]


def require_file(path: str | Path, what: str = "file") -> Path:
    if not str(path):  # (Path("") is ".", the current folder)
        raise InputError(f"the {what} path is empty: give a file path")
    try:
        if "\x00" in str(path):
            raise ValueError("embedded null byte")
        path = Path(path)
        exists, is_file = path.exists(), path.is_file()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long
        raise InputError(f"{what} path {shown(path)} is not usable ({exc}): check the path") from None
    if not exists:
        raise InputError(f"{what} not found: {shown(path)}: check the path")
    if not is_file:
        raise InputError(f"{what} {shown(path)} is not a regular file: give a file path")
    return path


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (a model can be large)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    """Only a file that exists can be overwritten ('digits' names no file, a new --out none)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist
        return False


_report: tuple[int, int] | None = None  # (device, inode) of the regular file the report goes to


def to_nowhere(fd: int) -> None:
    """Descriptor `fd` writes to /dev/null from now on."""
    null = os.open(os.devnull, os.O_WRONLY)  # (it may be given the number 2 itself, when stderr is closed)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


@contextlib.contextmanager
def native_output_to_nowhere() -> Iterator[None]:
    """Descriptors 1 and 2 point to /dev/null for the while: what native code writes there is
    no line of ours (torch's ONNX exporter dumps its graph to stdout on an error, log setting
    or not; while a command runs, descriptor 1 is stderr, and the report has its own)."""
    import fcntl

    saved = {}
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # (one that is closed: nothing to keep quiet)
                saved[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                to_nowhere(fd)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def report_to(fd: int | None) -> None:
    """The report of the command now running goes to descriptor `fd` (None: the command has
    ended): when that is a regular file, no file the command reads or writes may be it."""
    global _report
    _report = None
    if fd is not None:
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                _report = (st.st_dev, st.st_ino)


def refuse_the_report_file(path: str | Path, what: str) -> None:
    """InputError when `path` is the file stdout was sent to (`> k.dskey`, `>> marked.onnx`), by
    any name (a hard link too): the report would be appended to a bundle, which no command then
    opened, or to an input, or go into an output that the command replaces, lost without a word.
    A folder's files are checked one by one as they are listed (data, api._suspects)."""
    if _report is None:
        return
    if _identity(path) == _report:
        raise InputError(f"stdout is {shown(path)}, {what}: the report would be written into it; send the report "
                         "to another file")


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies in the folder `folder` (an image folder given as --data), at any depth."""
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError):  # (a loop of links)
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | Path, force: bool, *, inputs: dict[str, str | Path | None] | None = None,
                 option: str = "--out", update: bool = False) -> Path:
    """Refuse an output that would replace an input or lie in an input folder, an existing file
    without --force, a folder or anything else that is not a regular file, or a path in a folder
    that does not exist; fail early, before any work."""
    if not str(path).strip():
        raise InputError(f"{option} is empty: give a file path")
    if "\x00" in str(path):
        raise InputError(f"{option} {shown(path)} holds a NUL byte: choose another path")
    if str(path).endswith(("/", os.sep)):
        raise InputError(f"{option} {shown(path)} names a folder: give a file path for the output")
    try:
        path = Path(path)
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
        dead_link = not exists and path.is_symlink()  # (to nothing, or to itself: the name is still taken)
        parent_exists, parent_dir = path.parent.exists(), path.parent.is_dir()
    except (ValueError, OSError) as exc:
        raise InputError(f"{option} {shown(path)} is not a usable path ({exc}): choose another") from None
    if not path.name:
        raise InputError(f"{option} {shown(path)} names no file: give a file path")
    refuse_the_report_file(path, f"the {option} output")
    for name, other in (inputs or {}).items():
        if other is not None and _same_file(path, Path(other)) and not (update and name == option):
            raise InputError(
                f"{shown(path)} is also the {name} input: inputs are never overwritten; "
                "choose another output path"
            )
        if other is not None and _inside(path, Path(other)):
            raise InputError(f"{shown(path)} is inside the {name} folder: inputs are never written to; choose "
                             "an output path outside it")
    if is_dir:
        raise InputError(f"{shown(path)} is a directory: give a file path for the output")
    if exists and not is_file:  # replaced by rename, a device would be gone; opened, a FIFO would block
        raise InputError(f"{shown(path)} is not a regular file (a device, a FIFO or a socket): give a file "
                         "path for the output")
    if exists and not force and not update:
        raise OutputExistsError(f"{shown(path)} exists: pass --force to replace it, or choose another {option}")
    if dead_link and not force:
        raise OutputExistsError(f"{shown(path)} is a symbolic link that leads to no file: pass --force to replace "
                                f"the link, or choose another {option}")
    if not parent_exists:
        raise InputError(f"folder {shown(path.parent)} does not exist: create it first")
    if not parent_dir:
        raise InputError(f"{shown(path.parent)} is not a folder: choose another {option}")
    return path


class _Lock:
    """An exclusive, non-blocking lock on an existing file, held by an open descriptor.

    The file may be replaced by rename while another process waits on the old inode, so the
    lock counts only when the path still names the locked inode afterwards."""

    def __init__(self, path: Path, option: str):
        import fcntl

        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:  # (one it may not read: another user's, or mode 000)
            raise InputError(f"cannot open {shown(path)} ({option}) to lock it while the command runs "
                             f"({exc.strerror or exc}): make it readable, or choose another path") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(self.fd).st_ino != os.stat(path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(self.fd)
            raise InputError(
                f"{shown(path)} ({option}) is being written by another deepsigns command: wait "
                "for it to finish, then run this one again"
            ) from None

    def release(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def held_signals() -> Iterator[list[int]]:
    """Hold the STOP_SIGNALS for the duration (main thread only); yields the signals that came
    meanwhile, which the caller reports once its work is done."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in previous:
        signal.signal(s, lambda signum, frame: came.append(signum))
    try:
        yield came
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_HELD_SECONDS = 5  # what a signal held after the commit waits for the report before it counts as a second


def signal_again(signum: int, seconds: float, unless: Callable[[], bool] | None = None) -> None:
    """Send `signum` to this process again `seconds` from now, from a thread (so that its handler
    runs in the main thread's own code, not in the callback that asks), unless `unless()` is
    true by then. Once Python is shutting down no thread starts, and nothing is sent."""
    def again() -> None:
        if unless is None or not unless():
            os.kill(os.getpid(), signum)

    timer = threading.Timer(seconds, again)
    timer.daemon = True
    with contextlib.suppress(RuntimeError):
        timer.start()


class _Late:
    """The signals held from a command's commit to its end (`held_after_commit`)."""

    def __init__(self) -> None:
        self.came: list[int] = []
        self.written: list[str] = []
        self.previous: dict | None = None  # (the handlers before the first commit)
        self.suspended = 0  # (inside `not_final`)
        self.committing = False  # (renames under way: every signal waits for them)
        self.open = True  # (until the command's end)

    def engage(self, written: list[str]) -> None:
        if self.previous is None:
            self.previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._hold)
        self.written.extend(w for w in written if w not in self.written)

    def _hold(self, signum: int, frame) -> None:
        """The first signal waits for the report; a second ends the command at once, once no
        rename is under way (a report stuck on a pipe nobody reads had left only SIGKILL). A
        signal held comes again after _HELD_SECONDS while the command goes on: the one SIGTERM
        that `timeout`, a service manager or `docker stop` sends had left a command whose report
        was stuck on a full pipe waiting for ever."""
        self.came.append(signum)
        if len(self.came) > 1 and not self.committing:
            raise Interrupted(signum, tuple(self.written))
        signal_again(signum, _HELD_SECONDS, unless=lambda: not self.open)


_late: _Late | None = None


def _open_late() -> _Late | None:
    """The CLI's window, where this thread's commits hold signals to the command's end."""
    if _late is None or _late.suspended or threading.current_thread() is not threading.main_thread():
        return None
    return _late


@contextlib.contextmanager
def held_after_commit(*, restore: bool = True) -> Iterator[_Late]:
    """Around a whole command (the CLI's): from a commit on, the STOP_SIGNALS are
    held until the block ends, the report printed; the caller reports `came` and `written`. A
    signal there had cut the report short, and the command said that no output was written.
    `restore=False` (the process ends with the block): the signals are ignored from then on, so
    that one in the interpreter's teardown neither kills it (exit -15) nor prints a traceback."""
    global _late
    late = _late = _Late()
    try:
        yield late
    finally:
        _late, late.open = None, False
        if not restore and threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        elif late.previous is not None:
            for s, handler in late.previous.items():
                signal.signal(s, handler)


def outputs_written(written: list[str]) -> None:
    """The command's outputs are written (by another process: --nproc): signals are held from
    now to the end of `held_after_commit`, as after a commit."""
    late = _open_late()
    if late is not None:
        late.engage(written)


@contextlib.contextmanager
def not_final() -> Iterator[None]:
    """Commits inside are not the command's last (a sweep's attacks): signals still stop it
    after them."""
    late = _late
    if late is not None:
        late.suspended += 1
    try:
        yield
    finally:
        if late is not None:
            late.suspended -= 1


def stop_with_parent(parent: int) -> None:
    """Ask for SIGTERM when this process's parent (`parent`, its pid) dies, however it dies
    (SIGKILL included): a process of a run outlives the process that started it otherwise
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing is asked)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # (gone before prctl)
        os.kill(os.getpid(), signal.SIGTERM)


def run_by_agent() -> bool:
    """Whether torchrun's agent started this process (`--nproc` or torchrun): it has met the
    run's other agents, and serves the rendezvous's store. A process whose torch.distributed
    variables were set by hand (or left over) has not."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def is_main_process() -> bool:
    """Whether this process writes files and prints the report: the only one, or under torchrun
    the first (RANK 0)."""
    return run_place()[0] == 0


def run_place() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) where neither is set. InputError for a
    torch.distributed environment that is incomplete or wrong: a stray RANK=1 had made a plain
    `keygen` report a bundle it never wrote (a process not the first writes nothing), a stray
    WORLD_SIZE=2 waited 10 minutes for a rendezvous, and a word in either was an internal error."""
    env = os.environ

    def wrong(given: str, expected: str) -> InputError:
        return InputError(f"this process's torch.distributed settings are wrong ({given}, where torchrun sets "
                          f"{expected}): run under torchrun or with --nproc N, or unset RANK, WORLD_SIZE, "
                          "MASTER_ADDR and MASTER_PORT")

    def number(name: str, low: int, high: int, default: int | None = None, expected: str = "") -> int:
        text = env.get(name, "")
        if not text and default is not None:
            return default
        if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise wrong(f"{name}={one_line(repr(text), 40)}" if text else f"no {name}", expected or f"{low} to {high}")
        return int(text)

    world = number("WORLD_SIZE", 1, 1 << 20, default=1)
    rank = number("RANK", 0, world - 1, default=None if world > 1 else 0,
                  expected=f"0 to WORLD_SIZE - 1, and WORLD_SIZE is {env.get('WORLD_SIZE') and world or 'not set'}")
    if world > 1:
        number("MASTER_PORT", 1, 65535)
        number("LOCAL_RANK", 0, world - 1, default=0)
        if not env.get("MASTER_ADDR"):
            raise wrong("no MASTER_ADDR", "the first process's host")
    return rank, world


_TEMP_NAME = 200  # at most this many bytes of an output's name start its temporary file's (of 255)
# what the machine, not deepsigns, makes a write fail with: (errno, its text as libraries quote it)
_MACHINE = [(errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
            (errno.EFBIG, "File too large"), (errno.EROFS, "Read-only file system")]


#: the temporary folder's scratch files of deepsigns commands (`Outputs.scratch`)
_SCRATCH = "deepsigns-scratch-"
#: and its scratch folders (`scratch_folder`): an attack sweep's models, the quantize attack's ONNX files,
#: tempfile's folder while training's loader processes run
SCRATCH_FOLDERS = ("deepsigns-sweep-", "deepsigns-quantize-", "deepsigns-loader-")
_RANDOM = "?" * 8  # (the random part of a name tempfile.mkstemp or mkdtemp makes)
_STALE_SECONDS = 60  # a temporary file younger than this is never swept (it may be about to be locked)


def current_folder() -> str | None:
    """os.getcwd(); None for a current folder that was removed."""
    try:
        return os.getcwd()
    except OSError:
        return None


@contextlib.contextmanager
def folder_kept(folder: str | None = None):
    """The current folder, once the block ends, `folder` (by default: the one it began in),
    whatever code of the user's ran in it: the relative paths a command was given stay
    relative to the folder it was started in. A folder removed meanwhile is left to the
    checks of what is read or written there."""
    folder = current_folder() if folder is None else folder
    try:
        yield
    finally:
        back_to(folder)


def back_to(folder: str | None) -> None:
    """The current folder `folder` again, if it is another now (None: leave it)."""
    if folder is not None and current_folder() != folder:
        with contextlib.suppress(OSError):
            os.chdir(folder)


def _held_temp(held: list[int], prefix: str, suffix: str, folder: Path | None = None) -> Path:
    """A new temporary file (0600), locked by this process for as long as the descriptor it
    appends to `held` stays open: one that a command killed outright left is unlocked."""
    import fcntl

    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    held.append(fd)
    with contextlib.suppress(OSError):  # (a file system without locks: nothing is swept there)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return Path(os.path.abspath(tmp))  # (a Dataset of the user's may change the current folder meanwhile)


def _sweep(folder: Path, pattern: str, *, folders: bool = False, since: float | None = None) -> None:
    """Remove the files named by `pattern` in `folder` that commands killed outright left: this
    user's, regular, over a minute old, and locked by no process. `folders`: the folders so
    named instead (`scratch_folder`), with what they hold. `since`: those made since this time
    (time.time()) instead of those over a minute old (`sweep_run`)."""
    import fcntl
    import shutil

    try:
        found = list(folder.glob(pattern))
    except OSError:
        return
    for path in found:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if folders else 0))
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if ((stat.S_ISDIR if folders else stat.S_ISREG)(info.st_mode) and info.st_uid == os.getuid()
                    and (info.st_mtime >= since if since is not None else
                         time.time() - info.st_mtime > _STALE_SECONDS)):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (held: its command still runs)
                if os.lstat(path).st_ino == info.st_ino:
                    shutil.rmtree(path) if folders else path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def _sweep_scratch(folder: Path, since: float | None = None) -> None:
    """What commands killed outright left in the temporary folder: scratch files and folders."""
    _sweep(folder, f"{_SCRATCH}{_RANDOM}*", since=since)
    for prefix in SCRATCH_FOLDERS:
        _sweep(folder, f"{prefix}{_RANDOM}", folders=True, since=since)


def _short(target: Path) -> str:
    """The start of an output's name that starts its temporary file's: cut short, a legal long
    name leaves room for the temporary's ends (bytes count, not characters)."""
    return os.fsencode(target.name)[:_TEMP_NAME].decode("utf-8", "ignore")


def _part_pattern(target: Path) -> str:
    """The names of an output's temporary files (glob)."""
    return f"{glob.escape(f'.{_short(target)}.')}{_RANDOM}.part"


def sweep_run(outputs: list[str], since: float) -> None:
    """What the processes of a run that failed left, once every one has ended (a process killed
    outright cleans nothing up): the temporary files of its `outputs` and its scratch files in
    the temporary folder, made since `since` and held by no process (another command's are)."""
    for output in outputs:  # (an updated file's link is followed: `Outputs.add`)
        for target in {Path(output), Path(os.path.realpath(output))}:
            _sweep(target.parent, _part_pattern(target), since=since)
    _sweep_scratch(Path(tempfile.gettempdir()), since)


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A private folder (0700) in the temporary folder, for the command's own use, removed with
    what it holds when the block ends. It is locked (flock) while it lives: killed outright, the
    command leaves it unlocked, and the next command that makes a scratch file or folder removes
    it (`_sweep`); a live command's is never removed."""
    import fcntl
    import shutil

    if prefix not in SCRATCH_FOLDERS:  # (only the names the sweep knows: any other would be left forever)
        raise ValueError(f"a scratch folder's name starts with one of {SCRATCH_FOLDERS}, not {prefix!r}")
    root = Path(tempfile.gettempdir())
    _sweep_scratch(root)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # (a file system without locks: nothing is swept there)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # (removed before it is unlocked: never swept twice)
        os.close(fd)


_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}  # (a file system's refusal)


def _place(tmp: Path, target: Path) -> None:
    """Put tmp at target, which was not there when the command began: never over a file that
    another command wrote there meanwhile (a hard link fails where a name is taken; a file
    system without hard links gets a rename after one more look)."""
    try:
        os.link(tmp, target)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if not os.path.lexists(target):
            os.replace(tmp, target)
            return
    raise _taken(target)


# Linux's inode flags (FS_IOC_GETFLAGS): a file that neither root nor its owner may rename over
_GETFLAGS, _IMMUTABLE, _APPEND_ONLY = 0x80086601, 0x10, 0x20


def _unreplaceable(target: Path) -> str | None:
    """Why the system will refuse to rename a file over `target` (an existing output or an
    updated input), when that can be told beforehand; None otherwise."""
    try:
        st = os.lstat(target)
        folder = os.stat(target.parent)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return "it is a folder now"
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    if folder.st_mode & stat.S_ISVTX and euid not in (0, st.st_uid, folder.st_uid):
        return "another user's file, in a folder where only its owner may replace it"
    if stat.S_ISREG(st.st_mode):
        with contextlib.suppress(OSError, ImportError):
            import array
            import fcntl

            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            try:
                flags = array.array("l", [0])
                fcntl.ioctl(fd, _GETFLAGS, flags, True)
            finally:
                os.close(fd)
            if flags[0] & (_IMMUTABLE | _APPEND_ONLY):
                return "it is marked immutable or append-only (chattr)"
    return None


def _flush(path: Path) -> None:
    """Have the system write a file (or a folder's list of names) to the disk now. A file system
    that cannot (a folder on some) is left to its own pace."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _taken(target: Path) -> OutputExistsError:
    return OutputExistsError(f"{shown(target)} was written by another command while this one ran: pass --force "
                             "to replace it, or choose another path")


def _write_failure(exc: BaseException, entries, *, committing: bool = False) -> InputError | None:
    """One line for a failure to write the outputs that the machine caused (a full disk, a
    file-size limit, a folder removed meanwhile), which is no bug of ours; None for any other
    (our own errors are one line already). `committing`: it came while the outputs were being
    renamed into place, so the first of them may be written."""
    if isinstance(exc, DeepSignsError):
        return None
    done = "the outputs before it may be written" if committing else "nothing was written"
    gone = next((target.parent for target, tmp, _, _ in entries if not tmp.parent.is_dir()), None)
    if gone is not None:
        return InputError(f"folder {shown(gone)} was removed while the command ran: {done}; "
                          "create it and run the command again")
    code, text = getattr(exc, "errno", None), str(exc)
    reason = next((why for number, why in _MACHINE if code == number or why in text), None)
    if reason is None:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT) or reason in ("No space left on device", "Disk quota exceeded"):
        scratch = tempfile.gettempdir()
        with contextlib.suppress(OSError):
            room = os.statvfs(scratch)
            if room.f_bavail * room.f_frsize < _LOW_ROOM:  # (scratch files, an ONNX copy, a sweep's models)
                return InputError(f"cannot write in the temporary folder {shown(scratch)} ({reason}): {done}; free "
                                  "some space there, or set TMPDIR to a folder with room, then run the command again")
    return InputError(f"cannot write the outputs ({reason}): {done}; free some space, raise the limit or choose "
                      "a folder on another disk, then run the command again")


#: below this much room, a full disk is blamed on the temporary folder when that is where it is
_LOW_ROOM = 16 << 20


#: the name's ending of each kind of model file a command writes
MODEL_SUFFIXES = {"checkpoint": ".safetensors", "onnx": ".onnx"}


class Outputs:
    """A command's outputs, checked first and committed together (see the module's text)."""

    def __init__(self, *, force: bool, inputs: dict[str, str | Path | None] | None = None):
        self.force = force
        # under torchrun only the main process writes: the others write their copies to
        # private scratch files, removed at the end
        self.write = is_main_process()
        self.inputs = {k: v for k, v in (inputs or {}).items() if v is not None and str(v) != ""}
        # (target, temp, mode, whether it was not there: then it must not be by the commit either)
        self._entries: list[tuple[Path, Path, int | None, bool]] = []
        self._locks: list[_Lock] = []
        self._scratch: list[Path] = []
        self._held: list[int] = []  # (descriptors that hold the temporary files' locks)
        # the folder the outputs' names are relative to, gone back to before they are placed: a
        # Dataset of the user's that changed the current folder as it was read had failed the
        # commit of a relative --out after the whole training
        self._folder = current_folder()

    def add(self, path: str | Path, option: str = "--out", *, mode: int | None = None,
            update: bool = False, model: str | None = None) -> Path:
        """Declare an output; returns the temporary path to write it to.

        `update=True`: the file is an input updated in place (it must exist); it is locked. A
        symbolic link is followed: the file it leads to is the one updated and locked.
        `model`: the output is a model of this kind ("checkpoint" or "onnx"), whose name must
        end as every command that reads it expects (a kind is told by the name)."""
        target = check_output(path, self.force, inputs=self.inputs, option=option, update=update)
        if update and target.is_symlink():  # the file it leads to is updated (the link had been replaced by
            target = Path(os.path.realpath(target))  # a copy, the file it led to left as it was)
        for other, _, _, _ in self._entries:
            if other.resolve() == target.resolve():
                raise InputError(f"{shown(target)} is given for two outputs: choose another {option}")
        if model is not None and target.suffix.lower() != MODEL_SUFFIXES[model]:
            raise InputError(f"{option} {shown(path)} must end in {MODEL_SUFFIXES[model]}: deepsigns tells an ONNX "
                             "model from a checkpoint by its name")
        if not self.write:
            return self.scratch(target.suffix)
        fresh = not (target.exists() or target.is_symlink())  # (then it stays so: another command's is not replaced)
        if target.exists():
            why = _unreplaceable(target)
            if why is not None:  # (before any work: the commit would fail on it at the end)
                raise InputError(f"{option} {shown(target)} cannot be replaced ({why}): remove it or choose another "
                                 "path")
            self._locks.append(_Lock(target, option))
        try:
            _sweep(target.parent, _part_pattern(target))
            tmp = _held_temp(self._held, f".{_short(target)}.", ".part", target.parent)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"cannot write in folder {shown(target.parent)} ({getattr(exc, 'strerror', None) or exc}): choose "
                f"another {option} in a folder you can write"
            ) from None
        self._entries.append((target, tmp, mode, fresh and not self.force))
        return tmp

    def scratch(self, suffix: str = "") -> Path:
        """A private temporary file for the command's own use, removed when it ends."""
        folder = Path(tempfile.gettempdir())
        _sweep_scratch(folder)
        tmp = _held_temp(self._held, _SCRATCH, suffix, folder)
        self._scratch.append(tmp)
        return tmp

    def discard(self) -> None:
        for _, tmp, _, _ in self._entries:
            tmp.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        for fd in self._held:
            os.close(fd)
        self._held.clear()

    def commit(self) -> list[str]:
        """Rename every temporary file into place, in order, with the STOP_SIGNALS held."""
        written: list[str] = []
        late = _open_late()
        if late is not None:
            late.engage([])
            late.committing = True
        placing = None  # (the output being renamed into place)
        with held_signals() if late is None else contextlib.nullcontext(late.came) as came:
            try:
                # a name another command took meanwhile fails the commit before the first rename
                # (the bundle had been replaced for a model that was then never written)
                taken = next((t for t, _, _, fresh in self._entries if fresh and os.path.lexists(t)), None)
                if taken is not None:
                    raise _taken(taken)
                # and a file that the system will not let go (immutable, another user's in a shared
                # folder, a folder now): the bundle had been replaced for a model never written
                for target, _, _, fresh in self._entries:
                    why = None if fresh else _unreplaceable(target)
                    if why is not None:
                        raise InputError(f"cannot replace {shown(target)} ({why}): nothing was written; "
                                         "remove it or choose another path, then run the command again")
                for _, tmp, _, _ in self._entries:  # on the disk before any name changes (a power cut after
                    _flush(tmp)  # the command had left the bundle of 0 bytes: neither the old nor the new)
                for target, tmp, mode, fresh in self._entries:
                    placing = target
                    # temp files are 0600; outputs get the usual mode unless asked otherwise
                    os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
                    if fresh:
                        try:
                            _place(tmp, target)
                        except OutputExistsError as exc:
                            done = f" ({', '.join(map(shown, written))} written before it)" if written else ""
                            raise OutputExistsError(f"{exc}{done}") from None
                    else:
                        os.replace(tmp, target)
                    written.append(str(target))
                placing = None
                for folder in dict.fromkeys(Path(t).parent for t in written):
                    _flush(folder)  # (the new names themselves)
            except OSError as exc:  # (the system's refusal: one line, never an internal error)
                known = _write_failure(exc, self._entries, committing=True)  # (a full disk, a folder removed)
                if known is not None:
                    raise known from None
                done = f"{', '.join(map(shown, written))} written before it" if written else "nothing was written"
                raise InputError(f"cannot put {shown(placing) if placing else 'the outputs'} in place "
                                 f"({exc.strerror or one_line(exc)}): {done}; check the file and its folder, then "
                                 "run the command again") from None
            finally:
                for _, tmp, _, _ in self._entries:
                    tmp.unlink(missing_ok=True)  # what is left after a failed rename
                self._entries.clear()
                self._release()
                if late is not None:
                    late.engage(written)
                    late.committing = False
        if came and late is None:
            raise Interrupted(came[0], tuple(written))
        return written

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        back_to(self._folder)
        try:
            if exc_type is None:
                entries = list(self._entries)
                try:
                    self.commit()
                except OSError as failure:
                    raise _write_failure(failure, entries, committing=True) or failure from None
            else:  # KeyboardInterrupt included: never leave a partial file
                entries = list(self._entries)
                self.discard()
                failure = _write_failure(exc, entries) if isinstance(exc, Exception) else None
                if failure is not None:
                    raise failure from None
        finally:
            for path in self._scratch:
                path.unlink(missing_ok=True)
            self._scratch.clear()
