"""A command's outputs are committed as a group: checked before any work, written as
temporary files, renamed at the end (bundle first); SIGTERM is handled like Ctrl-C; a bundle
being updated is locked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    ENV,
    PASSPHRASE,
    assert_bad_input,
    assert_one_error_line,
    copy,
    deepsigns_argv,
    default_sigint,
    partial_files,
    reaped,
    run_cli,
    run_json,
    run_proc,
)
from test_errors import snapshot

from deepsigns_cli import api, fileio
from deepsigns_cli.errors import InputError, Interrupted, OutputExistsError


@pytest.fixture
def owner(tmp_path, marked):
    """Copies of the shared run's unmarked model and bundle (as embed left it: re-embeddable
    for the hidden scheme)."""
    return copy(marked.base, tmp_path / "base.safetensors"), copy(marked.keys, tmp_path / "k.dskey")


def _embed(tmp_path, base, keys, *extra, code=None):
    return run_cli("embed", "--model", base, "--keys", keys, "--out", tmp_path / "m.safetensors",
                   "--epochs", 1, *extra, code=code)


def test_an_output_named_like_a_folder_is_refused_before_any_work(tmp_path, owner):
    """`--out outdir/` once committed the bundle, then failed (fuzz seed 20261122 case 1030)."""
    before = snapshot(tmp_path)
    result = run_cli("embed", "--model", owner[0], "--keys", owner[1], "--out", f"{tmp_path}/outdir/",
                     "--epochs", 1, code=None)
    assert_bad_input(result, "names a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_output_that_is_not_a_regular_file_is_refused_even_with_force(tmp_path, owner, kind):
    """A FIFO (opened to be locked, it blocked forever) or a device node (replaced by rename: as
    root, `--out /dev/null --force` once deleted /dev/null) is never an output."""
    special = tmp_path / "special.onnx"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        os.mknod(special, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers (we run as root)
    before = snapshot(tmp_path)
    result = run_proc("export", owner[0], "--out", special, "--force", timeout=120)  # (a hang fails)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, result.stdout, "special.onnx", "not a regular file")
    assert snapshot(tmp_path) == before
    assert stat.S_ISFIFO(special.lstat().st_mode) if kind == "fifo" else stat.S_ISCHR(special.lstat().st_mode)


def test_same_path_for_two_outputs_is_refused_before_any_work(tmp_path, owner):
    before = snapshot(tmp_path)
    result = _embed(tmp_path, *owner, "--onnx", tmp_path / "m.safetensors")
    assert_bad_input(result, "two outputs")
    assert snapshot(tmp_path) == before


def test_same_existing_path_for_two_outputs_with_force(tmp_path, owner):
    (tmp_path / "m.safetensors").write_bytes(b"old")
    before = snapshot(tmp_path)
    result = _embed(tmp_path, *owner, "--onnx", tmp_path / "m.safetensors", "--force")
    assert_bad_input(result, "two outputs")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["--out", "--onnx", "--keys"])
def test_a_folder_that_cannot_be_written_fails_before_training(tmp_path, owner, monkeypatch, which):
    """We run as root, where chmod stops nothing: the probe is a real temporary file, and the
    failure is injected where the operating system would refuse it."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    base, keys = owner
    out, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    if which == "--keys":
        keys = copy(keys, blocked / "k.dskey")
    elif which == "--out":
        out = blocked / "m.safetensors"
    else:
        onnx = blocked / "m.onnx"
    real = fileio.tempfile.mkstemp

    def refuse(*args, dir=None, **kw):
        if Path(dir) == blocked:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    before = snapshot(tmp_path)
    started = time.perf_counter()
    result = run_cli("embed", "--model", base, "--keys", keys, "--out", out, "--onnx", onnx,
                     "--epochs", 1, code=None)
    assert_bad_input(result, "cannot write in folder", "blocked", which)
    assert snapshot(tmp_path) == before
    assert time.perf_counter() - started < 5  # no training happened first


def test_a_failed_export_after_training_writes_nothing(tmp_path, owner, monkeypatch):
    from deepsigns_cli import checkpoint
    from deepsigns_cli.errors import CheckpointError

    def broken(*args, **kwargs):
        raise CheckpointError("ONNX export differs from torch: report it")

    monkeypatch.setattr(checkpoint, "export_onnx", broken)
    before = snapshot(tmp_path)
    result = _embed(tmp_path, *owner, "--onnx", tmp_path / "m.onnx")
    assert_bad_input(result, "ONNX export differs")
    assert snapshot(tmp_path) == before  # the bundle too: its final keys are not half-saved


def test_the_bundle_is_committed_first(tmp_path, owner, monkeypatch):
    """A rename that fails mid-commit leaves the bundle (the proof) written, never a marked
    model without its keys."""
    base, keys = owner
    seen = []

    def failing(real):  # (the bundle is replaced; the new model linked into place)
        def place(src, dst):
            seen.append(Path(dst).name)
            if Path(dst).suffix == ".safetensors":
                raise OSError(5, "Input/output error")
            return real(src, dst)
        return place

    monkeypatch.setattr(fileio.os, "replace", failing(os.replace))
    monkeypatch.setattr(fileio.os, "link", failing(os.link))
    with pytest.raises(InputError, match="cannot put .*m.safetensors in place .*k.dskey written before it"):
        api.embed(base, keys, PASSPHRASE, tmp_path / "m.safetensors", epochs=1, device="cpu")
    assert seen == ["k.dskey", "m.safetensors"]
    assert partial_files(tmp_path) == []


def test_a_bundle_given_as_a_link_is_updated_where_it_leads(tmp_path, owner):
    """embed --keys link.dskey replaced the link by a file holding the new bundle, and the
    bundle it led to (vault/real.dskey) kept its old contents."""
    base, keys = owner
    (tmp_path / "vault").mkdir()
    real = keys.rename(tmp_path / "vault" / "real.dskey")
    link = tmp_path / "link.dskey"
    link.symlink_to(Path("vault") / "real.dskey")
    before = real.read_bytes()
    report = api.embed(base, link, PASSPHRASE, tmp_path / "m.safetensors", epochs=1, device="cpu")
    assert link.is_symlink() and os.readlink(link) == str(Path("vault") / "real.dskey")
    assert real.read_bytes() != before and report.commitment == api.check_commitment(real)
    assert partial_files(tmp_path) == [] and partial_files(tmp_path / "vault") == []


def test_a_locked_bundle_is_refused(tmp_path, owner):
    base, keys = owner
    lock = fileio._Lock(keys, "--keys")
    try:
        before = snapshot(tmp_path)
        result = _embed(tmp_path, base, keys)
        assert_bad_input(result, "being written by another deepsigns command", "k.dskey")
        assert snapshot(tmp_path) == before
    finally:
        lock.release()
    _embed(tmp_path, base, keys, code=0)  # released: it works


def test_signals_are_held_during_the_commit(tmp_path, monkeypatch):
    outs = fileio.Outputs(force=False)
    a, b = outs.add(tmp_path / "a.bin"), outs.add(tmp_path / "b.bin")
    a.write_bytes(b"a"), b.write_bytes(b"b")
    real = os.link  # (new outputs are linked into place: never over another command's file)

    def link(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the commit
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "link", link)
    with pytest.raises(Interrupted) as caught:
        outs.commit()
    assert caught.value.written == (str(tmp_path / "a.bin"), str(tmp_path / "b.bin"))
    assert (tmp_path / "a.bin").read_bytes() == b"a" and (tmp_path / "b.bin").read_bytes() == b"b"
    assert partial_files(tmp_path) == []


def test_a_file_another_command_wrote_meanwhile_is_not_replaced(tmp_path):
    """Two commands with one --out, neither with --force: both had passed the check at their
    start, and the later one replaced the earlier one's file (two keygens each printed a
    commitment, one of which matched no file)."""
    with pytest.raises(OutputExistsError, match="written by another command while this one ran"):
        with fileio.Outputs(force=False) as outs:
            outs.add(tmp_path / "k.dskey").write_bytes(b"mine")
            (tmp_path / "k.dskey").write_bytes(b"theirs")  # the other command commits first
    assert (tmp_path / "k.dskey").read_bytes() == b"theirs" and partial_files(tmp_path) == []
    with fileio.Outputs(force=True) as outs:  # --force: replacing is what was asked
        outs.add(tmp_path / "m.bin").write_bytes(b"mine")
        (tmp_path / "m.bin").write_bytes(b"theirs")
    assert (tmp_path / "m.bin").read_bytes() == b"mine"


def test_a_new_output_taken_meanwhile_fails_embed_before_the_bundle_is_replaced(tmp_path, owner):
    """Two embeds with one new --out: the second failed at the checkpoint's name, but had
    replaced its bundle first, with the fingerprint of a model it never wrote."""
    base, keys = owner
    out = tmp_path / "m.safetensors"
    before = keys.read_bytes()

    def another_command_commits(done, total, description):
        if not out.exists():
            out.write_bytes(b"theirs")

    with pytest.raises(OutputExistsError, match="written by another command while this one ran") as caught:
        api.embed(base, keys, PASSPHRASE, out, epochs=1, device="cpu", progress=another_command_commits)
    assert "written before it" not in str(caught.value)
    assert keys.read_bytes() == before and out.read_bytes() == b"theirs"
    assert partial_files(tmp_path) == []


def test_outputs_reach_the_disk_before_their_names_change(tmp_path, monkeypatch):
    """Every temporary file is flushed (fsync) before the first rename, and its folder after the
    last: a power cut after embed had left the bundle of 0 bytes, neither old nor new."""
    flushed, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append((os.readlink(f"/proc/self/fd/{fd}"), len(renamed))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(b), real_replace(a, b))[1])
    (tmp_path / "k.dskey").write_bytes(b"old")
    with fileio.Outputs(force=True) as outs:
        outs.add(tmp_path / "k.dskey").write_bytes(b"new")
        outs.add(tmp_path / "m.bin").write_bytes(b"model")
    assert (tmp_path / "k.dskey").read_bytes() == b"new" and (tmp_path / "m.bin").read_bytes() == b"model"
    files = [(Path(path).name, at) for path, at in flushed if Path(path).name.endswith(".part")]
    assert len(files) == 2 and all(at == 0 for _, at in files), flushed  # (both, before any rename)
    assert (str(tmp_path), 2) in flushed, flushed  # (the folder, after both)


def test_an_output_the_system_will_not_let_go_is_refused_before_any_work(tmp_path, owner):
    """An immutable file (chattr +i) at --out with --force: refused at once, the bundle as it
    was (embed had trained, replaced the bundle, then failed to rename: exit 3)."""
    base, keys = owner
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"theirs")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i is not allowed here (it needs root and a file system that keeps the flag)")
    try:
        before = keys.read_bytes()
        assert_bad_input(_embed(tmp_path, base, keys, "--force"), "cannot be replaced", "immutable")
        assert keys.read_bytes() == before and partial_files(tmp_path) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=False)


def test_a_rename_the_system_refuses_is_one_line_that_says_what_was_written(tmp_path, monkeypatch):
    """A rename refused at the very end (EPERM: a file made immutable meanwhile, a shared
    folder): one line that names the output and what went before it (it had been an internal
    error, exit 3, naming a temporary file)."""
    real_replace = os.replace

    def refuse(src, dst):
        if str(dst).endswith("m.bin"):
            raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    (tmp_path / "k.dskey").write_bytes(b"old")
    (tmp_path / "m.bin").write_bytes(b"theirs")
    with pytest.raises(InputError) as caught:
        with fileio.Outputs(force=True) as outs:
            outs.add(tmp_path / "k.dskey").write_bytes(b"new")
            outs.add(tmp_path / "m.bin").write_bytes(b"mine")
    line = str(caught.value)
    assert "cannot put" in line and "m.bin" in line and "Operation not permitted" in line and ".part" not in line
    assert "k.dskey" in line.split("):", 1)[1] and "written before it" in line
    assert (tmp_path / "m.bin").read_bytes() == b"theirs" and partial_files(tmp_path) == []


def test_a_folder_removed_meanwhile_is_one_line(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(InputError, match="was removed while the command ran"):
        with fileio.Outputs(force=False) as outs:
            outs.add(folder / "m.safetensors")
            folder.joinpath(".keep").write_bytes(b"")
            shutil.rmtree(folder)
            raise FileNotFoundError(2, "No such file or directory")  # as the writer meets it


def test_a_full_disk_is_one_line_and_exit_2(marked, tmp_path):
    """A file-size limit (a full disk reads the same): 'a bug in deepsigns', exit 3, before."""
    import resource

    def small():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([*deepsigns_argv(), "export", str(marked.marked), "--out", str(tmp_path / "m.onnx")],
                          env={**os.environ, **ENV}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          preexec_fn=small, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "cannot write the outputs", "File too large")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("letter", ["m", "\u00e9", "\u6f22"], ids=["1 byte", "2 bytes", "3 bytes"])
def test_a_long_legal_name_is_written(tmp_path, letter):
    """A name of up to 255 bytes: its temporary file's name had been too long for the file system
    (first for 245 one-byte characters, then for 80 three-byte ones: the cut counted characters)."""
    name = letter * (243 // len(letter.encode())) + ".safetensors"
    assert len(name.encode()) <= 255
    with fileio.Outputs(force=False) as outs:
        outs.add(tmp_path / name).write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x"


def test_an_output_whose_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        fileio.check_output(tmp_path / "f" / "out.onnx", False)


@pytest.mark.parametrize("target", ["nowhere.safetensors", "m.safetensors"], ids=["to nothing", "to itself"])
def test_a_link_that_leads_nowhere_is_replaced_only_with_force(tmp_path, target):
    """Its name is taken, as a file's is (a dead link had been replaced without a word)."""
    link = tmp_path / "m.safetensors"
    link.symlink_to(target)
    result = run_cli("train", "--arch", "mlp", "--epochs", 1, "--out", link, code=2)
    assert_one_error_line(result.stderr, result.stdout, "symbolic link", "--force")
    assert link.is_symlink() and os.readlink(link) == target
    run_cli("train", "--arch", "mlp", "--epochs", 1, "--out", link, "--force", code=0)
    assert link.is_file() and not link.is_symlink()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU,
                                 signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU", "SIGUSR1"])
def test_a_signal_during_embed_and_a_second_embed_meanwhile(tmp_path, owner, sig):
    """A real process: a second embed on the same bundle is refused while the first runs;
    SIGTERM, SIGHUP and SIGQUIT (like SIGINT) end the first cleanly: its own exit code, one line,
    nothing left (SIGQUIT, Ctrl-\\, had ended it as its default does, exit 131 with no line and
    the outputs' .part files left behind; so had SIGXCPU, which ulimit -t sends, and SIGUSR1,
    which a batch scheduler sends before it kills a job)."""
    base, keys = owner
    before = snapshot(tmp_path)
    env = {**os.environ, **ENV}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.Popen([*deepsigns_argv(), "embed", "--model", str(base), "--keys", str(keys),
                             "--out", str(tmp_path / "m.safetensors"), "--epochs", "100000",
                             "--device", "cpu"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    with reaped(proc):
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".m.safetensors.*.part")):  # its outputs are declared
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(1.0)  # training now
        second = run_cli("embed", "--model", base, "--keys", keys, "--out", tmp_path / "n.safetensors",
                         "--epochs", 1, code=None)
        assert_bad_input(second, "being written by another deepsigns command")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted: no output was written")
    assert snapshot(tmp_path) == before
    assert partial_files(tmp_path) == []


def test_a_thread_that_dies_while_sigterm_stops_the_command_prints_nothing(capsys):
    """SIGTERM to `train --workers 2` ended with its one line, then, one run in three, with the
    traceback of multiprocessing's resource sharer thread (a handshake with a stopped worker)."""
    import threading

    from deepsigns_cli.cli import main

    def a_thread_dies():
        thread = threading.Thread(target=lambda: 1 / 0)
        thread.start()
        thread.join()

    previous = threading.excepthook
    threading.excepthook = main._thread_failed
    try:
        a_thread_dies()
        assert "ZeroDivisionError" in capsys.readouterr().err  # (any other time: shown, as Python shows it)
        main._STOPPING.set()
        a_thread_dies()
        assert capsys.readouterr().err == ""
    finally:
        main._STOPPING.clear()
        threading.excepthook = previous


def test_a_linked_bundle_that_leads_into_an_input_folder_is_refused(tmp_path):
    """Where a link leads is what is checked (a bundle updated where the link leads must not be
    written into the --data folder: inputs are never written to)."""
    data = tmp_path / "images"
    data.mkdir()
    (data / "k.dskey").write_bytes(b"sealed")
    (tmp_path / "link.dskey").symlink_to(data / "k.dskey")
    outs = fileio.Outputs(force=False, inputs={"--data": data})
    with pytest.raises(InputError, match="inside the --data folder"):
        outs.add(tmp_path / "link.dskey", "--keys", update=True)
    outs.discard()
    assert (data / "k.dskey").read_bytes() == b"sealed" and partial_files(data) == []


@pytest.mark.parametrize("signals", [2, 1])
def test_a_second_signal_ends_a_command_whose_report_cannot_be_written(tmp_path, marked, signals):
    """Signals are held from the commit until the report is printed; a report stuck on a pipe
    that nobody reads (full) had left the command unstoppable but by SIGKILL. One signal alone
    (what `timeout` or a service manager sends) comes again a few seconds later, and ends it."""
    import fcntl

    keys = tmp_path / "k.dskey"
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, os.O_NONBLOCK)
    with contextlib.suppress(BlockingIOError):  # the pipe full before the command writes to it
        while True:
            os.write(write_end, b"x" * 4096)
    fcntl.fcntl(write_end, fcntl.F_SETFL, 0)
    proc = subprocess.Popen([*deepsigns_argv(), "keygen", "--model", str(marked.base), "--out", str(keys), "--json"],
                            env={**os.environ, **ENV}, stdin=subprocess.DEVNULL, stdout=write_end,
                            stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    try:
        with reaped(proc):
            deadline = time.monotonic() + 120
            while not keys.exists():  # committed: the report is being written, and blocks
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            if signals == 2:
                time.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=30)[1]
    finally:
        os.close(read_end)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert_one_error_line(err, "", "interrupted after every output was written", "k.dskey")


_HOLDER = """
import sys, time
from deepsigns_cli import fileio
outs = fileio.Outputs(force=False)
print(outs.add(sys.argv[1]), outs.scratch(".onnx"), flush=True)
time.sleep(600)
"""


def _holder(target: Path, scratch: Path) -> tuple[subprocess.Popen, list[Path]]:
    """A live command that holds its temporary file for `target` and a scratch file in `scratch`:
    (the process, [the two files])."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target)], env={**ENV, "TMPDIR": str(scratch)},
                            stdout=subprocess.PIPE, text=True)
    return proc, [Path(p) for p in proc.stdout.readline().split()]


def _left_by_a_killed_command(target: Path, scratch: Path) -> list[Path]:
    """What a command killed outright (SIGKILL) left: its temporary file for `target`, its scratch file."""
    killed, left = _holder(target, scratch)
    killed.kill()
    killed.wait()
    killed.stdout.close()
    return left


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A temporary folder of the test's own (tempfile's, and its processes' TMPDIR)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_what_a_killed_command_left_is_removed_by_the_next_one_and_what_a_live_one_holds_is_not(tmp_path,
                                                                                              scratch):
    """SIGKILL (the out-of-memory killer) gives a command no chance to clean up: every run of
    `--nproc 2` whose second process was killed left that process's scratch files in /tmp (187
    of them here), and a killed first process its `.part` file next to the output."""
    target = tmp_path / "m.safetensors"
    left = _left_by_a_killed_command(target, scratch)
    live, held = _holder(target, scratch)
    try:
        with pytest.raises(KeyError), fileio.Outputs(force=False) as young:  # (a file less than a minute
            young.add(target), young.scratch(".onnx")                        # old may be about to be locked)
            raise KeyError
        assert all(p.exists() for p in left + held)
        for path in left + held:
            os.utime(path, (time.time() - 120,) * 2)
        with fileio.Outputs(force=False) as outs:
            outs.add(target).write_bytes(b"mine")
            outs.scratch(".safetensors")  # (any scratch file: what is left is removed whatever its kind)
        assert not any(p.exists() for p in left) and all(p.exists() for p in held)
        assert target.read_bytes() == b"mine"
    finally:
        live.kill()
        live.wait()
    assert partial_files(tmp_path) == [held[0].name] and os.listdir(scratch) == [held[1].name]


def test_a_failed_runs_launcher_removes_what_its_killed_processes_left_since_it_began(tmp_path, scratch):
    """`sweep_run`: at once, not a minute later, but only what was made since the run began and
    is held by no process (a live command's files, and an older command's leftovers, stay)."""
    target = tmp_path / "m.safetensors"
    before = _left_by_a_killed_command(target, scratch)
    for path in before:
        os.utime(path, (time.time() - 30,) * 2)
    began = time.time() - 1
    left = _left_by_a_killed_command(target, scratch)
    live, held = _holder(target, scratch)
    try:
        fileio.sweep_run([str(target)], began)
        assert not any(p.exists() for p in left) and all(p.exists() for p in before + held)
    finally:
        live.kill()
        live.wait()
        live.stdout.close()


_FOLDER_HOLDER = """
import sys, time
from deepsigns_cli import fileio
with fileio.scratch_folder(sys.argv[1]) as folder:
    (folder / "copy.onnx").write_bytes(b"a model's copy")
    print(folder, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("command", [
    ["attack", "quantize", "--out", "{tmp}/int8.onnx"],
    ["attack", "prune", "--sweep", "rate=0.5", "--keys", "{keys}"]], ids=["quantize", "sweep"])
def test_a_killed_commands_scratch_folder_is_removed_by_the_next_one_and_a_live_ones_is_not(tmp_path, monkeypatch,
                                                                                           marked, command):
    """An attack sweep (its models) and the quantize attack (its ONNX files) make a folder in the
    temporary folder: killed outright, they left it there, never removed."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def holder(prefix: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen([sys.executable, "-c", _FOLDER_HOLDER, prefix], env={**ENV, "TMPDIR": str(scratch)},
                                stdout=subprocess.PIPE, text=True)
        return proc, Path(proc.stdout.readline().strip())

    left = []
    for prefix in fileio.SCRATCH_FOLDERS:  # (whichever command left it)
        killed, folder = holder(prefix)
        killed.kill()
        killed.wait()
        killed.stdout.close()
        left.append(folder)
    live = [holder(prefix) for prefix in fileio.SCRATCH_FOLDERS]
    held = [folder for _, folder in live]
    try:
        with fileio.scratch_folder(fileio.SCRATCH_FOLDERS[0]):  # (one less than a minute old may be about to be
            pass                                                 # locked)
        assert all((p / "copy.onnx").exists() for p in left + held)
        for path in left + held:
            os.utime(path, (time.time() - 120,) * 2)
        args = [str(a).format(tmp=tmp_path, keys=marked.keys) for a in command]
        run_json(*args, "--model", marked.marked)
        assert not any(p.exists() for p in left) and all((p / "copy.onnx").exists() for p in held)
    finally:
        for proc, _ in live:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert sorted(os.listdir(scratch)) == sorted(p.name for p in held)  # (the command's own: removed)


@pytest.mark.parametrize("delay", [0.0, 0.05], ids=["while printing", "in teardown"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_once_the_outputs_are_written_never_says_nothing_was(tmp_path, marked, sig, delay):
    """A signal while keygen printed its report said "no output was written" (exit 143), the
    bundle written and the report cut short; a little later, in the interpreter's teardown, it
    killed the process (exit -15) or printed a traceback after exit 0."""
    keys = tmp_path / "k.dskey"
    proc = subprocess.Popen([*deepsigns_argv(), "keygen", "--model", str(marked.base), "--out", str(keys),
                             "--json"], env={**os.environ, **ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0, preexec_fn=default_sigint)
    with reaped(proc):
        first = proc.stdout.readline()  # the report has begun: the bundle is written
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode in (0, 128 + sig), err
    assert "Traceback" not in err and "no output was written" not in err, err
    if proc.returncode:
        assert_one_error_line(err, "", "interrupted after every output was written", "k.dskey")
    report = json.loads(first + out)  # printed whole
    assert report["commitment"] == api.check_commitment(keys)
    assert keys.is_file() and partial_files(tmp_path) == []


def test_a_full_temporary_folder_is_named(tmp_path, monkeypatch):
    """A full disk under TMPDIR (a sweep's models, scratch files) had been blamed on the outputs'
    folder ("choose a folder on another disk"), when no output was even asked for."""
    import types

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    full = OSError(28, "No space left on device")
    room = {"free": 0}
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=room["free"], f_frsize=4096))
    line = str(fileio._write_failure(full, []))
    assert "temporary folder" in line and str(tmp_path) in line and "TMPDIR" in line, line
    room["free"] = 1 << 30  # (the temporary folder has room: the outputs' disk is the full one)
    line = str(fileio._write_failure(full, []))
    assert "cannot write the outputs" in line and "TMPDIR" not in line, line
