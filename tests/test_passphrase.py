"""Where the passphrase comes from: a file, a pipe (`--passphrase-file <(pass show key)`, a
FIFO), the variable. A pipe is read once per command, and one that nothing writes to is refused
in bounded time, never waited for forever."""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time

import pytest
from helpers import (
    PASSPHRASE,
    assert_bad_input,
    assert_one_error_line,
    deepsigns_argv,
    default_sigint,
    partial_files,
    process_env,
    run_cli,
)

from deepsigns_cli import api
from deepsigns_cli.bundle import open_bundle, write_bundle
from deepsigns_cli.cli import common
from deepsigns_cli.errors import InputError

NO_VARIABLE = {"DEEPSIGNS_PASSPHRASE": None}


def bash(command: str, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """`command` in bash, where `deepsigns` is the installed script: process substitution is bash's."""
    deepsigns = " ".join(map(shlex.quote, deepsigns_argv()))
    return subprocess.run(["bash", "-c", command.replace("deepsigns ", f"{deepsigns} ", 1)],
                          env=process_env(NO_VARIABLE), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def test_a_passphrase_through_process_substitution_seals_and_opens(marked, tmp_path):
    """`<(printf %s pw)` is a pipe at /dev/fd/N: it was refused as 'not a regular file'."""
    keys = tmp_path / "k.dskey"
    proc = bash(f"deepsigns keygen --model {marked.base} --scheme hidden --out {keys} "
                "--passphrase-file <(printf %s 'from a pipe')")
    assert proc.returncode == 0, proc.stderr
    assert list(open_bundle(keys, "from a pipe").schemes) == ["hidden"]
    proc = bash(f"deepsigns extract --model {marked.marked} --keys {marked.keys} "
                f"--passphrase-file <(printf '%s\\n' {shlex.quote(PASSPHRASE)})")  # (its newline is no part of it)
    assert proc.returncode == 0, proc.stderr


def test_each_party_of_a_dispute_gives_its_passphrase_through_a_pipe(marked, tmp_path):
    thief, thief_keys = tmp_path / "thief.safetensors", tmp_path / "thief.dskey"
    api.keygen(marked.marked, thief_keys, "the thief's", schemes=["hidden"], seed=7)
    api.embed(marked.marked, thief_keys, "the thief's", thief, epochs=3, seed=7, device="cpu")
    owner = shlex.quote(PASSPHRASE)
    proc = bash(f"deepsigns dispute --json --party {marked.keys} <(printf %s {owner}) {marked.marked} "
                f"--party {thief_keys} <(printf %s \"the thief's\") {thief}")
    assert proc.returncode in (0, 1) and proc.stdout.startswith("{"), proc.stderr


def _core_dumps_on() -> None:
    """preexec_fn: core dumps as large as the hard limit allows (`ulimit -c unlimited`)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def test_a_fifo_that_nothing_writes_to_is_refused_in_bounded_time(marked, tmp_path):
    """Opened for reading, a FIFO with no writer blocks forever: the reason FIFOs had been
    refused. Now it is waited for PIPE_WAIT_SECONDS, then refused with one line. Meanwhile the
    command, which is about to hold a passphrase, writes no core dump (one had held it in clear)."""
    fifo = tmp_path / "pw"
    os.mkfifo(fifo)
    started = time.monotonic()
    proc = subprocess.Popen([*deepsigns_argv(), "extract", "--model", str(marked.marked), "--keys", str(marked.keys),
                             "--passphrase-file", str(fifo)], env=process_env(NO_VARIABLE), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_core_dumps_on)
    try:
        time.sleep(common.PIPE_WAIT_SECONDS / 2)
        if os.path.exists(f"/proc/{proc.pid}/limits"):
            with open(f"/proc/{proc.pid}/limits") as limits:
                core = next(line for line in limits if line.startswith("Max core file size"))
            assert core.split()[4] == "0", core  # (the soft limit)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2, stderr
    assert_one_error_line(stderr, stdout, "no passphrase came through", "pw", "--passphrase-file")
    assert common.PIPE_WAIT_SECONDS <= time.monotonic() - started < common.PIPE_WAIT_SECONDS + 60


@pytest.fixture
def short_wait(monkeypatch):
    monkeypatch.setattr(common, "PIPE_WAIT_SECONDS", 1)


def test_a_pipe_is_read_once_per_command(tmp_path, short_wait):
    """A pipe gives its bytes once: a second reading in one command (two dispute parties with
    one FIFO, a sweep's attacker passphrase at every strength) waited, then failed."""
    fifo = tmp_path / "pw"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("once\r\n"))
    writer.start()
    try:
        assert common.get_passphrase(str(fifo)) == "once"
        assert common.get_passphrase(str(fifo)) == "once"
    finally:
        common.forget_passphrases()
        writer.join(timeout=5)
    with pytest.raises(InputError, match="no passphrase came through"):  # (the next command reads again)
        common.get_passphrase(str(fifo))


@pytest.mark.parametrize("writes, needle", [
    ("printf pw; sleep 30", "was not closed within 1 s"),
    ("yes", "more than 64 KiB")])
def test_a_pipe_that_never_ends_is_refused(writes, needle, short_wait):
    proc = subprocess.Popen(["bash", "-c", writes], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        with pytest.raises(InputError, match=needle):
            common.get_passphrase(f"/dev/fd/{proc.stdout.fileno()}")
    finally:
        common.forget_passphrases()
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("path", ["/dev/null", "/dev/zero", "a folder"])
def test_a_folder_or_a_device_is_still_refused(path, tmp_path):
    path = tmp_path if path == "a folder" else path
    with pytest.raises(InputError, match="not a regular file nor a pipe"):
        common.get_passphrase(str(path))


# ----------------------------------------------------------------------------- the variable's line ending


def test_the_variables_line_ending_is_no_part_of_the_passphrase_as_a_files_is_not(marked, tmp_path):
    """DEEPSIGNS_PASSPHRASE=$'pw\\n' was used as is, a file's pw\\n without its ending: a bundle
    sealed with one could not be opened with the other."""
    pw = tmp_path / "pw.txt"
    pw.write_text(PASSPHRASE + "\n")
    with_ending = {"DEEPSIGNS_PASSPHRASE": PASSPHRASE + "\r\n"}
    run_cli("extract", "--model", marked.marked, "--keys", marked.keys, env=with_ending)  # sealed under a file's
    keys = tmp_path / "k.dskey"
    run_cli("keygen", "--model", marked.base, "--scheme", "hidden", "--out", keys, env=with_ending)
    assert list(open_bundle(keys, PASSPHRASE).schemes) == ["hidden"]
    run_cli("extract", "--model", marked.marked, "--keys", keys, "--passphrase-file", pw, env=NO_VARIABLE, code=1)


def test_a_bundle_sealed_with_the_variables_line_ending_still_opens(marked, tmp_path):
    """Sealed before the ending was dropped, with the variable as given: opened with it when the
    passphrase alone fails, and sealed again by embed without it."""
    keys = tmp_path / "k.dskey"
    write_bundle(open_bundle(marked.keys, PASSPHRASE), keys, PASSPHRASE + "\n")
    run_cli("extract", "--model", marked.marked, "--keys", keys, env={"DEEPSIGNS_PASSPHRASE": PASSPHRASE + "\n"})
    assert_bad_input(run_cli("extract", "--model", marked.marked, "--keys", keys, code=None), "wrong passphrase")
    run_cli("embed", "--model", marked.marked, "--keys", keys, "--out", tmp_path / "again.safetensors",
            "--epochs", 1, "--device", "cpu", env={"DEEPSIGNS_PASSPHRASE": PASSPHRASE + "\n"})
    assert open_bundle(keys, PASSPHRASE).schemes


def test_a_variable_of_a_line_ending_alone_is_refused(marked):
    assert_bad_input(run_cli("extract", "--model", marked.marked, "--keys", marked.keys, code=None,
                             env={"DEEPSIGNS_PASSPHRASE": "\n"}), "DEEPSIGNS_PASSPHRASE", "line ending")


def _at_a_terminal(argv: list[str], answer: bytes, *, after: float = 1.0,
                   timeout: float = 120) -> tuple[bytes, bytes, int]:
    """Run argv on a pseudo-terminal (stdin, stdout and stderr), without the variable; once it
    shows the prompt, wait `after` seconds, type `answer`; (what it showed from the prompt until
    the answer was typed, all it showed, its exit code)."""
    import pty
    import select

    env = {k: v for k, v in process_env(NO_VARIABLE).items() if k not in ("NO_COLOR", "TERM")}
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (the child)
        default_sigint()  # (Ctrl-C must reach it, however the suite was started)
        os.execvpe(argv[0], argv, {**env, "TERM": "xterm", "COLUMNS": "100"})
    shown, prompted, typed, deadline = b"", None, None, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if prompted is not None and typed is None and time.monotonic() >= prompted + after:
                os.write(fd, answer)
                typed = len(shown)
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # (the child closed the terminal: it ended)
                    break
                if not chunk:
                    break
                shown += chunk
                if prompted is None and b"Passphrase: " in shown:
                    prompted = time.monotonic()
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    waiting = shown[:typed].split(b"Passphrase: ", 1)[-1] if typed is not None else b""
    return waiting, shown, os.waitstatus_to_exitcode(status)


def test_the_prompt_stays_on_screen_under_the_progress_bar_and_ctrl_c_there_interrupts(marked, tmp_path):
    """embed asks for the passphrase while its progress bar is up: the bar had redrawn itself over
    the prompt ten times a second (an empty line, a command that seemed to hang). And Ctrl-C at
    the prompt had been an internal error (exit 3); Ctrl-D, which click reads alike, too."""
    out = tmp_path / "m.safetensors"
    argv = [*deepsigns_argv(), "embed", "--model", str(marked.base), "--keys", str(marked.keys), "--out", str(out),
            "--epochs", "1", "--device", "cpu"]
    waiting, shown, code = _at_a_terminal(argv, b"\x03")
    assert b"Passphrase: " in shown and b"\x1b[2K" not in waiting, shown  # (no line erased while it waited)
    assert code == 130 and b"interrupted: no output was written" in shown, shown
    assert not out.exists() and partial_files(tmp_path) == []


def test_a_utf8_passphrase_in_the_variable_opens_its_bundle_in_the_c_locale(marked, tmp_path):
    """With LC_ALL=C and PYTHONUTF8=0 Python reads the environment as ASCII, and a UTF-8
    passphrase had been refused as "not UTF-8 text"; bytes that are not UTF-8 still are."""
    keys = tmp_path / "k.dskey"
    api.keygen(marked.base, keys, "pässwörd", schemes=["hidden"], seed=0)
    c_locale = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    argv = [*deepsigns_argv(), "extract", "--model", str(marked.base), "--keys", str(keys), "--json"]
    proc = subprocess.run(argv, env=process_env({**c_locale, "DEEPSIGNS_PASSPHRASE": "pässwörd"}),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert proc.returncode == 1 and b'"key_id"' in proc.stdout, proc.stderr  # (opened: not detected in the base)
    env = {k.encode(): v.encode() for k, v in process_env({**c_locale, "DEEPSIGNS_PASSPHRASE": None}).items()}
    proc = subprocess.run(argv, env={**env, b"DEEPSIGNS_PASSPHRASE": b"p\xff"}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr, proc.stderr
