"""Data-parallel runs of `train` and `embed`: under torchrun, and the `--nproc N` shortcut.

`torchrun --nproc-per-node N -m deepsigns_cli embed ...` starts N processes; each joins one
process group (`training.distributed`), trains on its share of every epoch, and only the
first (RANK 0) writes files and prints the report. `deepsigns embed --nproc N ...` launches
the same through `torch.distributed.run` on this machine, and reports as one command: the
first process's report, or one error line and exit 2 when any process failed (3 when it was
an internal error; nothing is written then: the first process writes only after every process
has finished training).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress

import click

from ..api import PRECISIONS
from ..errors import InputError, Interrupted, shown
from .common import ERROR_TAG_ENV, EXIT_BAD_INPUT, EXIT_INTERNAL, PASSPHRASE_ENV, Whole, relay_report

__all__ = ["nproc_option", "workers_option", "precision_option", "is_main", "relaunch"]

#: a line of torch's own log (glog's prefix: level, date, time), as torchrun and c10d print them
_TORCH_LOG = re.compile(r"\[?[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")
#: a process in torchrun's summary of a failed run ("rank : 1 ...", then "exitcode : -9 ..."): (rank, code)
_ENDED = r"^\s*rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*{code}"
_SIGNALLED = re.compile(_ENDED.format(code=r"-(\d+)"), re.M)  # (one that a signal ended: the signal)
_EXITED = re.compile(_ENDED.format(code=r"(\d+)"), re.M)  # (one that exited with a code of its own)
#: what a process of a run says when its step with another failed, as that one ended: an echo
_ECHO = "another process of this run failed"
_ECHOED = re.compile(rf"process (\d+) of \d+: {_ECHO}")  # (the echo's line: the rank that echoed)
_STOP_SECONDS = 60  # what an interrupted run's launcher is given to stop its processes
_DRAIN_SECONDS = 2  # what its pipes are given to end once it has ended (its processes have)
# ... and once it was killed: its processes then end by themselves (each is sent SIGTERM when its
# parent dies), which took a loaded machine more than 2 s, and the command had returned while one
# still ran
_ORPHANS_SECONDS = 30


def nproc_option(fn):
    return click.option("--nproc", type=Whole(), default=None, metavar="N",
                        help="Run data-parallel in N processes on this machine (torch.distributed.run; "
                             "one per GPU on CUDA, else one per CPU core). For several machines, start "
                             "torchrun yourself: torchrun --nproc-per-node N -m deepsigns_cli ...")(fn)


def workers_option(fn):
    return click.option("--workers", type=Whole(0, 64), default=0, show_default=True,
                        help="Processes that read and decode training batches (an image folder).")(fn)


def precision_option(fn):
    return click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
                        show_default=True,
                        help="Autocast the forward pass to bf16 or fp16 (fp16: CUDA only, with loss scaling).")(fn)


def is_main() -> bool:
    """The process that prints the report: the one that writes the files."""
    from .. import api

    return api.is_main_process()


def relaunch(nproc: int, device: str, *, asks: bool = False, passphrase_file: str | None = None) -> None:
    """Run this very command again in `nproc` processes under torch.distributed.run, without
    --nproc; exit as it exits, its failures reported as one line. `asks`: the command would
    ask for the passphrase at the terminal (`asks_passphrase`), which its processes have not.
    `passphrase_file`: the command's --passphrase-file; one that its processes cannot read
    themselves (a pipe, which is read once; a name of this process's own, as /dev/fd/N) is read
    here and handed to them in their environment as DEEPSIGNS_PASSPHRASE (never on disk, nor on
    a command line, which any user can see)."""
    from .. import api

    if api.world_size() > 1:  # (WORLD_SIZE=1 left over, as a plain command takes it, is no torchrun run)
        raise InputError("--nproc inside a torchrun process: give one or the other")
    if nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")
    if asks:
        # (their stdin is /dev/null: they said "no passphrase" without asking)
        raise InputError(f"--nproc cannot ask for the passphrase (its processes have no terminal): set "
                         f"{PASSPHRASE_ENV} or pass --passphrase-file")

    available, what = api.parallel_slots(device)
    if nproc > available:
        raise InputError(f"--nproc {nproc} is more than the {available} {what} here: use at most {available}")
    argv = _without(sys.argv[1:], "--nproc")
    # (PYTHONSAFEPATH: python -m puts the current folder first on sys.path, in the launcher and in
    # every process it starts, where a click.py or numpy.py there would run in place of the library)
    tag = f"[{secrets.token_hex(8)}] "  # (their error lines: not a line that a factory of the user's printed)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONSAFEPATH": "1",
           ERROR_TAG_ENV: tag}
    if passphrase_file and not _theirs_too(passphrase_file):
        env[PASSPHRASE_ENV] = _handed_over(passphrase_file)
        argv = _without(argv, "--passphrase-file")
    # (no --log-dir: the launcher made an empty torchelastic_* folder in the temporary folder, every run)
    # (torch.distributed.run through a module of ours, which sweeps what its processes left: `agent`)
    command = [sys.executable, "-m", "deepsigns_cli.cli.agent", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={os.devnull}", "-m", "deepsigns_cli", *argv]
    proc, written = _run_to_the_end(command, env)
    if proc.returncode == 0 and written:  # (what the processes printed on stderr: warnings, a factory's output)
        relay_report(proc.stdout)
        sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if not _TORCH_LOG.match(line)))
        sys.exit(0)
    if proc.returncode == 0:  # (no failure to torchrun: every process ended with exit 0, os._exit(0) in a factory)
        click.echo(f"error: every process of the {nproc}-process run ended with exit 0 before the first had written "
                   "anything, and no error line (os._exit(0) in code of yours?); nothing was written", err=True)
        sys.exit(EXIT_BAD_INPUT)
    # a process's own failure, not the interruption of the others that torchrun then stopped
    # (this process was not interrupted: a Ctrl-C here would have ended it before this line)
    mine = f"{tag}error: "
    errors = [line[len(mine):] for line in proc.stderr.splitlines()
              if line.startswith(mine) and not line.startswith(f"{mine}interrupted")]
    # the cause before its echoes (the others' "another process of this run failed"): a process
    # killed outright (the out-of-memory killer) says nothing itself, torchrun names it
    errors.sort(key=lambda line: _ECHO in line)
    killed = _killed(proc.stderr, nproc)
    exited = _exited(proc.stderr, errors, nproc)
    silent = exited or f"a process of the {nproc}-process run failed (exit {proc.returncode})"
    # (what torchrun saw end it, where it saw it, wins over a line another process echoed; so does
    # the agent's own death by a signal: it stopped its processes, and one whose step with the
    # other failed as that one stopped echoed it)
    first = errors[0] if errors and not ((killed or exited or proc.returncode < 0) and _ECHO in errors[0]) else \
        killed or f"{silent}; nothing was written"
    if written:  # (a process that failed after the first had written: at its exit, say)
        cause = errors[0] if errors else silent
        first = (f"a process of the {nproc}-process run failed after the first had written "
                 f"{', '.join(map(shown, written))}, each complete ({cause.split('; nothing was written')[0]}): "
                 "check the run's processes before using them")
    click.echo(f"error: {first}", err=True)
    sys.exit(EXIT_INTERNAL if first.startswith("internal error") else EXIT_BAD_INPUT)


def _exited(stderr: str, errors: list[str], nproc: int) -> str | None:
    """The words for a process that ended with a code of its own and no error line (os._exit(7)
    in a factory), where torchrun's own code is 1 whatever the process's was; None if there is
    none. torchrun's summary names it as the root cause, or among the failures: the others that
    then failed (each with its line "process R of N: another process of this run failed") may be
    observed in the same instant, and the first of them called the root cause. A process that
    ended with exit 0 before the others were done is no failure to torchrun: it is the one that
    neither failed nor echoed."""
    echoed = {match[1] for match in map(_ECHOED.match, errors) if match}
    before, _, root = stderr.rpartition("Root Cause")
    for found in (*_EXITED.finditer(root), *_EXITED.finditer(before)):
        if found[1] not in echoed:
            return f"process {found[1]} of {nproc} ended with exit {found[2]} and no error line"
    if "Root Cause" not in stderr:  # (no summary of torchrun's, whose agent was killed: who ended how is not known)
        return None
    failed = {found[1] for pattern in (_EXITED, _SIGNALLED) for found in pattern.finditer(stderr)}
    early = [rank for rank in map(str, range(nproc)) if rank not in failed | echoed]
    if echoed and len(early) == 1:
        return f"process {early[0]} of {nproc} ended with exit 0 before the run was over, and no error line"
    return None


def _killed(stderr: str, nproc: int) -> str | None:
    """The error line for a run of which torchrun's summary names a process ended by a signal
    (as its root cause, or among the failures: the others that then failed may be observed in
    the same instant); None otherwise."""
    found = _SIGNALLED.search(stderr.rpartition("Root Cause")[2]) or _SIGNALLED.search(stderr)
    if found is None:
        return None
    rank, number = found.groups()
    try:
        name = signal.Signals(int(number)).name
    except ValueError:
        name = f"signal {number}"
    why = " (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
    return f"process {rank} of {nproc} was killed by {name}{why}; nothing was written"


def _run_to_the_end(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, tuple[str, ...]]:
    """Run torch.distributed.run to its end. Interrupted (Ctrl-C, or SIGTERM to this process
    alone, as `kill` or a service manager sends it), it is asked to stop its processes (SIGTERM,
    which it passes on to them) and waited for: killed at once, as subprocess.run kills it, it
    left them training, and the first wrote its outputs later. The interruption then names the
    outputs the run had written by then (they are complete: each is renamed into place whole).
    A run that failed or was stopped leaves no temporary file: a process killed outright (the
    out-of-memory killer) left its own (`api.sweep_run`). Returns (the run, the outputs it wrote)."""
    from ..api import held_signals, outputs_written, sweep_run

    before = _outputs(command)
    began = time.time() - 1  # (a file's time is the kernel's coarse clock: a little behind this one)

    def written() -> tuple[str, ...]:  # (an output is renamed into place: its identity changes)
        return tuple(path for path, seen in before.items() if _identity(path) != seen)

    launcher = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, preexec_fn=_stop_with_parent(os.getpid()))
    readers = [_Drain(launcher.stdout), _Drain(launcher.stderr)]
    try:
        with _suspended_with(launcher.pid):
            launcher.wait()
        wait = _ORPHANS_SECONDS if launcher.returncode < 0 else _DRAIN_SECONDS
        out, err = (reader.text(wait) for reader in readers)
        if launcher.returncode == 0 and written():  # (a signal from now is held until the report is relayed)
            outputs_written(list(written()))
        else:  # (its processes have ended: what one killed outright, or one that ended early, left is no one's)
            sweep_run(list(before), began)
    except BaseException as exc:
        with held_signals():  # (a second Ctrl-C or SIGTERM must not end this wait: the run is stopping)
            launcher.send_signal(signal.SIGTERM)
            try:  # (it gives its processes 30 s to end, then kills them)
                launcher.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
            sweep_run(list(before), began)
        done = written()
        if done and isinstance(exc, KeyboardInterrupt):
            raise Interrupted(getattr(exc, "signum", signal.SIGINT), done) from None
        raise
    return subprocess.CompletedProcess(command, launcher.returncode, out, err), written()


class _Drain:
    """A pipe of the launcher's read to its end in a thread of its own. `text` waits for that end
    a bounded time once the run is over: a process that a --data factory started and left running
    holds the pipe it inherited, and waiting for its end had kept the command waiting as long."""

    def __init__(self, pipe):
        self.chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 1 << 16), b""):
            self.chunks.append(chunk)

    def text(self, wait: float = _DRAIN_SECONDS) -> str:
        """What was read, as text mode reads it (any line ending as a newline); its end waited
        for `wait` seconds at most."""
        self._thread.join(timeout=wait)
        text = b"".join(list(self.chunks)).decode("utf-8", errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")


def _run_groups(launcher: int) -> set[int]:
    """The process groups of a run: the launcher's own (`_stop_with_parent`) and each of its
    processes' (torch.distributed.run starts each in a session of its own; their loader
    processes share it). Its processes are read from /proc: the launcher's group alone where
    that cannot be read."""
    groups = {launcher}
    with suppress(OSError):
        for task in os.listdir(f"/proc/{launcher}/task"):
            with open(f"/proc/{launcher}/task/{task}/children") as children:
                groups.update(int(pid) for pid in children.read().split())
    return groups


def _signal_run(launcher: int, signum: int) -> None:
    for group in _run_groups(launcher):
        with suppress(OSError):
            os.killpg(group, signum)


@contextmanager
def _suspended_with(launcher: int):
    """Ctrl-Z (SIGTSTP) suspends the run's processes with the command, and `fg` (SIGCONT) resumes
    them: they run in process groups of their own, which a terminal's signals do not reach."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        _signal_run(launcher, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # (stops here, until SIGCONT)
        signal.signal(signal.SIGTSTP, stop)

    def resume(signum, frame) -> None:
        _signal_run(launcher, signal.SIGCONT)

    before = {s: signal.signal(s, handler) for s, handler in ((signal.SIGTSTP, stop), (signal.SIGCONT, resume))}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _stop_with_parent(parent: int):
    """preexec_fn: the launcher gets SIGTERM when this process dies, however it dies (SIGKILL
    included), and stops its processes as on Ctrl-C: killed alone, this process had left them
    training, and the first wrote its outputs after the command had ended (its processes ask the
    same of the launcher: `training.distributed`). It runs in a process group of its own, so
    that a terminal's Ctrl-C (or a signal to the command's group) reaches this process alone,
    which passes one SIGTERM on: a second signal that reached torchrun's agent while it stopped
    its processes cut that short, and it then waited for ever, at its exit, for their logs
    (Ctrl-C twice took the command 60 s, `_STOP_SECONDS`, to end)."""
    from ..api import stop_with_parent

    def setup() -> None:
        os.setpgid(0, 0)
        stop_with_parent(parent)

    return setup


def _outputs(command: list[str]) -> dict[str, tuple[int, int] | None]:
    """The files the command names as outputs (--out, --onnx, and --keys, which embed updates),
    each with its identity now."""
    options = ("--out", "--onnx", "--keys")
    paths = [value for option, value in zip(command, command[1:], strict=False) if option in options]
    paths += [arg.split("=", 1)[1] for arg in command if arg.startswith(tuple(f"{o}=" for o in options))]
    return {path: _identity(path) for path in paths}


def _identity(path: str) -> tuple[int, int] | None:
    """(inode, modification time) of a file; None where there is none. An output is renamed
    into place: a new inode."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_ino, st.st_mtime_ns


def _theirs_too(path: str) -> bool:
    """Whether the run's processes can read the passphrase file themselves: a regular file by a
    name that leads to it in every process (not /dev/stdin nor /dev/fd/N, whose descriptors they
    do not inherit). A file that cannot be looked at is left to them, which say why."""
    import stat

    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return True
    return regular and not os.path.abspath(path).startswith(("/dev/", "/proc/"))


def _handed_over(path: str) -> str:
    from .common import get_passphrase

    secret = get_passphrase(path)
    if "\x00" in secret:  # (an environment cannot hold it)
        raise InputError(f"passphrase file {shown(path)} holds a NUL character, which --nproc cannot hand to its "
                         "processes: run without --nproc, or take it out of the passphrase")
    return secret


def _without(args: list[str], option: str) -> list[str]:
    """`args` without `option` and its value (`--option VALUE` or `--option=VALUE`)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            out.append(arg)
    return out
