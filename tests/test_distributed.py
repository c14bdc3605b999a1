"""Data-parallel `embed` across processes (torchrun's machinery, gloo on the CPU), and its
failures: every process trains on its share, the first writes; a process that dies fails the
run with one line and nothing written."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    PASSPHRASE,
    assert_one_error_line,
    deepsigns_argv,
    default_sigint,
    partial_files,
    process_env,
    run_proc,
)

from deepsigns_cli import api
from deepsigns_cli.bundle import open_bundle

TESTS = Path(__file__).resolve().parent
ENV = {"DEEPSIGNS_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(TESTS)}
# what torchrun gives the first of two processes
TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_two_process_embed_marks_with_every_scheme(tmp_path):
    """hidden, output and gradsigns in one bundle, embedded by 2 processes: all three read back
    (the later embeddings keep the earlier marks), from the checkpoint and from scores."""
    base, keys, marked = tmp_path / "base.safetensors", tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    api.train("mlp", base, epochs=15, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden", "output", "gradsigns"],
               options={"key_size": 20, "bits": 32}, seed=0)
    # (--epochs 30 caps the output scheme's 60 epochs of settling after it learnt 99% of its
    # candidates, 27 s of this test's 45: the other schemes stop by themselves well before it)
    proc = run_proc("embed", "--nproc", 2, "--model", base, "--data", "digits", "--keys", keys, "--out", marked,
                    "--onnx", tmp_path / "marked.onnx", "--device", "cpu", "--seed", 1, "--epochs", 30, "--json",
                    env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # one report: the first process's
    assert list(report["schemes"]) == ["hidden", "output", "gradsigns"]
    assert report["accuracy_after"] >= report["accuracy_before"] - 1.0
    decision = api.extract(marked, keys, PASSPHRASE)
    assert decision.detected
    hidden, output, gradsigns = decision.results
    assert hidden.bit_errors == 0 and output.matches >= 18 and gradsigns.bit_errors == 0
    verdict = api.verify(tmp_path / "marked.onnx", keys, PASSPHRASE)
    assert [r.scheme for r in verdict.results] == ["output", "gradsigns"] and verdict.detected
    assert verdict.results[1].bit_errors == 0 and verdict.results[1].queries <= 1000
    assert partial_files(tmp_path) == []


def test_two_machines_meet_through_torchruns_rendezvous(tmp_path):
    """Two torchrun launchers, one process each, meet as two machines do (torchrun's c10d
    rendezvous at an address, not --standalone): the one that gets rank 0 reports and writes,
    the other says nothing, and the mark reads back."""
    base, keys, marked = tmp_path / "base.safetensors", tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    api.train("mlp", base, epochs=5, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], options={"bits": 32}, seed=0)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = process_env({**ENV, "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-machines",
               "-m", "deepsigns_cli", "embed", "--model", str(base), "--data", "digits", "--keys", str(keys),
               "--out", str(marked), "--device", "cpu", "--seed", "1", "--json"]
    machines = [subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [machine.communicate(timeout=600) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], [err for _, err in results]
    reports = [json.loads(out) for out, _ in results if out.strip()]
    assert len(reports) == 1 and reports[0]["schemes"]["hidden"]["read_back"].startswith("0/")
    assert api.extract(marked, keys, PASSPHRASE).results[0].bit_errors == 0
    assert partial_files(tmp_path) == []


def test_more_processes_than_cores_is_refused(tmp_path):
    proc = run_proc("embed", "--nproc", 4096, "--model", tmp_path / "m.safetensors", "--keys", tmp_path / "k.dskey",
                    "--out", tmp_path / "o.safetensors", "--device", "cpu", env=ENV)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, proc.stdout, "--nproc 4096", "CPU cores")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_that_dies_fails_the_run_and_nothing_is_written(tmp_path, rank):
    """A process killed outright (SIGKILL, as the out-of-memory killer ends it) cleans nothing
    up: the first left its outputs' temporary files beside them, another its scratch files in
    the temporary folder, and the line said only that another process had failed."""
    arch = "dying_model:Net"
    base, keys, marked = tmp_path / "base.safetensors", tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    api.train(arch, base, epochs=3, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], arch=arch, seed=0)
    sealed = keys.read_bytes()
    proc = run_proc("embed", "--nproc", 2, "--arch", arch, "--model", base, "--keys", keys, "--out", marked,
                    "--onnx", tmp_path / "marked.onnx", "--device", "cpu",
                    env={**ENV, "DEEPSIGNS_TEST_DIE": str(rank), "TMPDIR": str(scratch)}, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, f"process {rank} of 2 was killed by SIGKILL", "nothing was written")
    assert not marked.exists() and not (tmp_path / "marked.onnx").exists()
    assert keys.read_bytes() == sealed and partial_files(tmp_path) == []
    # (not ours: torch's compile cache, and the 51-byte session id that onnxruntime writes into
    # the temporary folder the first time it runs there, as any export's parity check does)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_") and p.name != ".ses"] == []


def test_a_process_that_fails_after_the_outputs_were_written_says_so(tmp_path):
    """The launcher said "nothing was written" of a run whose first process had written its
    outputs before another failed as it exited."""
    out = tmp_path / "m.safetensors"
    proc = run_proc("train", "--nproc", 2, "--arch", "mlp", "--data", "dying_model:fails_at_exit", "--epochs", 1,
                    "--out", out, "--device", "cpu", env=ENV, timeout=600)
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error_line(proc.stderr, proc.stdout, "after the first had written", "m.safetensors",
                                 "each complete", "process 1 of 2 ended with exit 5 and no error line")
    assert "nothing was written" not in line
    assert api.inspect(out).kind == "checkpoint"


@pytest.mark.parametrize(("code", "every", "said"), [
    (7, "", "process 1 of 2 ended with exit 7 and no error line"),
    (0, "", "process 1 of 2 ended with exit 0 before the run was over, and no error line"),
    (0, "1", "every process of the 2-process run ended with exit 0 before the first had written anything"),
], ids=["exit-7", "exit-0", "all-exit-0"])
def test_a_process_that_ends_without_a_word_is_named_with_its_exit_code(tmp_path, code, every, said):
    """A factory that ends process 1 with os._exit(7) was reported as "a process of the
    2-process run failed (exit 1)": torchrun's own code, not the process's. With os._exit(0),
    which torchrun counts as no failure, the line named the other process (whose step with it
    failed) as the one that had said nothing (helper-62); ended so in every process, the run
    was a success, exit 0 and no report, its temporary files left (helper-64)."""
    out = tmp_path / "m.safetensors"
    proc = run_proc("train", "--nproc", 2, "--arch", "mlp", "--data", "dying_model:exits_silently", "--epochs", 1,
                    "--out", out, "--device", "cpu", timeout=600,
                    env={**ENV, "DEEPSIGNS_TEST_EXIT": str(code), "DEEPSIGNS_TEST_EXIT_ALL": every})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, said, "nothing was written")
    assert not out.exists() and partial_files(tmp_path) == []


@pytest.mark.parametrize(("factory", "needle"), [
    ("ranked_data", "process 1: 240 samples of shape [16], labels up to 14"),
    ("sharded_data", "the same counts and shapes, but other labels in process 1 than in process 0")])
def test_processes_that_load_different_data_fail_with_one_line(tmp_path, factory, needle):
    """Each process of a run must see the same data (each takes its share of the rows): one that
    saw more classes ended in DistributedDataParallel's "appears not to match" as an internal
    error, which --nproc then reported with exit 2; shards of one size (data[rank::2]) were
    taken, and each process trained on its share of its own shard."""
    out = tmp_path / "m.safetensors"
    proc = run_proc("train", "--nproc", 2, "--arch", "mlp", "--data", f"dying_model:{factory}", "--epochs", 1,
                    "--out", out, "--device", "cpu", env=ENV, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "do not train the same model on the same data", needle)
    assert not out.exists() and partial_files(tmp_path) == []


@pytest.mark.parametrize("fails", [False, True], ids=["success", "failure"])
def test_what_a_factory_prints_is_passed_on_and_nothing_is_left_behind(tmp_path, fails):
    """--nproc kept only its processes' warnings of a successful run (a factory's output was
    lost), and took the first line that started "error: " for the run's error: a factory's log
    line replaced the real cause. Every run, whatever its end, left an empty torchelastic_*
    folder in the temporary folder (the launcher's log folder; torch's per-user inductor cache
    is torch's own). Run from a folder that holds a click.py (a folder of downloaded files):
    python -m had put it first on the path of the launcher and of every process, and it ran in
    place of click. WORLD_SIZE=1 left over (which a plain command takes as no torchrun run) had
    refused --nproc."""
    out, scratch, here = tmp_path / "m.safetensors", tmp_path / "tmp", tmp_path / "downloads"
    scratch.mkdir()
    here.mkdir()
    (here / "click.py").write_text("open('RAN', 'w').close()\nraise SystemExit(7)\n")
    env = {**ENV, "TMPDIR": str(scratch), "WORLD_SIZE": "1", **({"DEEPSIGNS_TEST_NAN": "1"} if fails else {})}
    proc = run_proc("train", "--nproc", 2, "--arch", "mlp", "--data", "dying_model:noisy", "--epochs", 1,
                    "--out", out, "--device", "cpu", env=env, timeout=600, cwd=here)
    if fails:
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, proc.stdout, "train sample 7 holds NaN")
        assert not out.exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert sorted(proc.stderr.splitlines()) == ["and one written to file descriptor 1"] * 2 + \
            ["error: the factory's own log line, no failure"] * 2  # (each process's)
        assert "factory's own" not in proc.stdout and api.inspect(out).kind == "checkpoint"
    # (not ours: torch's compile cache, and the 51-byte session id that onnxruntime writes into
    # the temporary folder the first time it runs there, as any export's parity check does)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_") and p.name != ".ses"] == []
    assert sorted(p.name for p in here.iterdir()) == ["click.py"]


def test_a_process_a_factory_leaves_running_does_not_hold_the_command(tmp_path):
    """--nproc read its processes' output to its end, and a process that a factory started and
    left running held the pipes it inherited: the command waited as long as that process lived
    (the same command without --nproc ends at once)."""
    left = tmp_path / "left.pid"
    try:
        proc = run_proc("train", "--nproc", 2, "--arch", "mlp", "--data", "dying_model:leaves_a_process", "--epochs", 1,
                        "--out", tmp_path / "m.safetensors", "--device", "cpu", "--json",
                        env={**ENV, "DEEPSIGNS_TEST_LEFT": str(left)}, timeout=90)  # (it lives 120 s)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["out"] == str(tmp_path / "m.safetensors")
    finally:
        if left.exists():
            os.kill(int(left.read_text()), signal.SIGKILL)


def test_ctrl_z_suspends_every_process_of_the_run(tmp_path):
    """The run's processes have process groups of their own, which a terminal's Ctrl-Z (SIGTSTP
    to the command's group) does not reach: they trained on, and wrote, while the command was
    stopped. The command stops them with itself; SIGCONT (fg) resumes them."""
    arch, training = "dying_model:Net", tmp_path / "training"
    base, keys, marked = tmp_path / "base.safetensors", tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    api.train(arch, base, epochs=3, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], arch=arch, seed=0)
    proc = subprocess.Popen([*deepsigns_argv(), "embed", "--nproc", "2", "--arch", arch, "--model", str(base),
                             "--keys", str(keys), "--out", str(marked), "--epochs", "500", "--device", "cpu"],
                            env=process_env({**ENV, "DEEPSIGNS_TEST_TRAINING": str(training)}),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def states() -> dict[int, str]:  # the run's processes (not the command): pid -> state
        pids = subprocess.run(["pgrep", "-f", f"(deepsigns_cli.cli.agent|-m deepsigns_cli) .*{marked}"],
                              capture_output=True, text=True).stdout.split()
        found = {}
        for pid in pids:
            try:  # (after the name, which is in parentheses: the state)
                found[int(pid)] = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                pass
        return found

    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{training}.{rank}").exists() for rank in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTSTP)
        deadline = time.monotonic() + 30
        while not (len(seen := states()) == 3 and set(seen.values()) == {"T"}):
            assert time.monotonic() < deadline, f"not all stopped: {seen}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while "T" in states().values():
            assert time.monotonic() < deadline, f"not all resumed: {states()}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        for pid in states():  # (a stopped process would hold the SIGTERM that killing the command sends it)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not marked.exists() and states() == {}


def test_python_m_does_not_run_a_module_of_the_current_folder(tmp_path):
    """`torchrun ... -m deepsigns_cli` (the README's multi-machine command) starts python -m."""
    (tmp_path / "click.py").write_text("open('RAN', 'w').close()\nraise SystemExit(7)\n")
    proc = subprocess.run([sys.executable, "-m", "deepsigns_cli", "--version"], cwd=tmp_path, env=process_env(ENV),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["click.py"]


def test_nproc_at_a_terminal_without_a_passphrase_says_it_cannot_ask(tmp_path):
    """Its processes get no terminal: they failed "no passphrase" after loading, without asking."""
    import os

    base, keys = tmp_path / "base.safetensors", tmp_path / "owner.dskey"
    api.train("mlp", base, epochs=1, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], seed=0)
    terminal, pty = os.openpty()
    try:
        proc = subprocess.run([*deepsigns_argv(), "embed", "--nproc", "2", "--model", str(base), "--keys", str(keys),
                               "--out", str(tmp_path / "m.safetensors"), "--device", "cpu"],
                              env=process_env({"DEEPSIGNS_PASSPHRASE": None}), stdin=pty, capture_output=True,
                              text=True, timeout=600)
    finally:
        os.close(terminal), os.close(pty)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "--nproc cannot ask for the passphrase",
                          "DEEPSIGNS_PASSPHRASE", "--passphrase-file")


def test_nproc_hands_a_passphrase_from_a_pipe_to_its_processes(tmp_path):
    """`--passphrase-file <(...)`: its processes inherit no /dev/fd/63 (they said 'not found'),
    and a pipe is read once: the command reads it and hands it to them in their environment."""
    import shlex

    base, keys, marked = tmp_path / "base.safetensors", tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    api.train("mlp", base, epochs=1, seed=0, device="cpu")
    api.keygen(base, keys, "from a pipe", schemes=["hidden"], options={"bits": 32}, seed=0)
    deepsigns = " ".join(map(shlex.quote, deepsigns_argv()))
    proc = subprocess.run(["bash", "-c", f"{deepsigns} embed --nproc 2 --model {base} --keys {keys} --out {marked} "
                           "--epochs 2 --device cpu --json --passphrase-file <(printf 'from a pipe\\n')"],
                          env=process_env({**ENV, "DEEPSIGNS_PASSPHRASE": None}), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["schemes"]) == ["hidden"] and marked.is_file()
    assert open_bundle(keys, "from a pipe").info["embedded"]  # (rewritten, sealed with the same passphrase)


@pytest.mark.parametrize("how", ["SIGTERM twice", "Ctrl-C twice", "SIGKILL", "SIGKILL, the first process deaf",
                                 "SIGKILL to torchrun's agent", "SIGKILL to torchrun's agent, echoed"])
def test_stopping_the_command_alone_stops_every_process_and_nothing_is_written(tmp_path, how):
    """`kill PID` (a service manager's stop) reaches the command, not its processes: it killed
    the launcher outright, said "no output was written", and the orphaned processes trained on
    and a minute later wrote the model and rewrote the bundle. A second SIGTERM ended the
    command's wait for them; SIGKILL left them running, and they wrote after it was gone. The
    agent between the command and its processes (torch.distributed.run) killed alone left them
    training too, and the first wrote after the command had said "nothing was written". Ctrl-C
    twice at a terminal (SIGINT to the command's process group) reached the agent as well, twice,
    and cut its stopping short: it then waited for ever, and the command killed it after 60 s.
    Where the agent was killed, a process whose step with the other failed as that one stopped
    ("another process of this run failed", echoed) had been taken for the cause. Where the command
    was killed and the first process could not act on its SIGTERM (waiting on the other in a
    collective), torchrun's agent killed it outright 30 s later, and its temporary files were left
    beside the outputs (one run in a fresh clone's suite)."""
    arch, training = "dying_model:Net", tmp_path / "training"
    base, keys, marked = tmp_path / "base.safetensors", tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    api.train(arch, base, epochs=3, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], arch=arch, seed=0)
    sealed = keys.read_bytes()
    proc = subprocess.Popen([*deepsigns_argv(), "embed", "--nproc", "2", "--arch", arch, "--model", str(base),
                             "--keys", str(keys), "--out", str(marked), "--epochs", "500", "--device", "cpu"],
                            env=process_env({**ENV, "DEEPSIGNS_TEST_TRAINING": str(training),
                                             "DEEPSIGNS_TEST_ECHO": "1" if how.endswith("echoed") else None,
                                             "DEEPSIGNS_TEST_DEAF": "0" if how.endswith("deaf") else None}),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=how.startswith("Ctrl-C"),  # (a group of its own, as a terminal's job)
                            preexec_fn=default_sigint)  # (a suite run as a shell's background job ignores SIGINT)
    deadline = time.monotonic() + 120  # (until both processes train: a step takes them 50 ms from then on)
    while not all(Path(f"{training}.{rank}").exists() for rank in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(0.5)
    if how.startswith("SIGKILL") and "agent" not in how:
        proc.kill()
    elif "agent" in how:
        agent = subprocess.run(["pgrep", "-f", f"deepsigns_cli.cli.agent.*{marked}"], capture_output=True,
                               text=True).stdout.split()
        assert len(agent) == 1, agent
        os.kill(int(agent[0]), signal.SIGKILL)
    elif how.startswith("Ctrl-C"):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
    # (an interrupted run's launcher that does not end is killed after 60 s: well within, it ended)
    out, err = proc.communicate(timeout=40 if how.startswith("Ctrl-C") else 120)
    if how.startswith("SIGKILL") and "agent" not in how:  # (nothing of it can speak: its processes are
        # stopped for it, within a minute)
        assert proc.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-f", str(marked)], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "the run's processes outlived the command"
            time.sleep(0.5)
    elif "agent" in how:  # (its processes go with it: the command waits for them, then says so)
        assert proc.returncode == 2, err
        assert_one_error_line(err, out, "failed (exit -9); nothing was written")
        left = subprocess.run(["pgrep", "-f", str(marked)], capture_output=True, text=True).stdout.split()
        assert left == [], "the run's processes outlived the command"
    else:
        assert proc.returncode == 128 + (signal.SIGINT if how.startswith("Ctrl-C") else signal.SIGTERM), err
        assert_one_error_line(err, out, "interrupted: no output was written")
        left = subprocess.run(["pgrep", "-f", str(marked)], capture_output=True, text=True).stdout.split()
        assert left == [], "the run's processes outlived the command"
    time.sleep(1)  # (every process of the run is gone by now: nothing can come later)
    assert not marked.exists() and keys.read_bytes() == sealed and partial_files(tmp_path) == []


@pytest.mark.parametrize("stray", [{"RANK": "1"}, {"WORLD_SIZE": "2"}, {"RANK": "first"},
                                   {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": "99999"}],
                         ids=["rank-alone", "world-alone", "rank-a-word", "port-out-of-range"])
def test_a_stray_distributed_environment_is_one_line_and_nothing_else(tmp_path, stray):
    """A plain command run where torch.distributed variables are left over: RANK=1 made keygen
    report a sealed bundle it never wrote (exit 0; a process not the first writes nothing),
    WORLD_SIZE=2 waited 10 minutes for a rendezvous, a word or a bad port was an internal error."""
    sample = TESTS.parent / "sample_models" / "digits-mlp.safetensors"
    for args in (["keygen", "--model", sample, "--out", tmp_path / "k.dskey"],
                 ["train", "--arch", "mlp", "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors"]):
        proc = run_proc(*args, env={**ENV, **stray}, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, proc.stdout, "torch.distributed settings are wrong", "unset RANK")
        assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_rendezvous_port_in_use_is_one_line(tmp_path):
    """Settings left over from another run, whose MASTER_PORT something here listens on: the
    first process cannot serve the rendezvous there (EADDRINUSE), which was an internal error."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = run_proc("train", "--arch", "mlp", "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors",
                        env={**ENV, **TORCHRUN, "MASTER_PORT": str(port)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "could not meet the others", f"127.0.0.1:{port}",
                          "free --master-port", "unset RANK")
    assert list(tmp_path.iterdir()) == []


def test_a_signal_ends_a_rendezvous_that_never_completes(tmp_path):
    """Rank 0 of 2, its peer never started: it waits in C++ for the rendezvous, where no Python
    handler runs, and SIGTERM had gone unheard until the 10-minute timeout. It ends at once,
    and a signal it was started to ignore (SIGINT, as a shell's background job) stays ignored."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = process_env({**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    out = tmp_path / "m.safetensors"
    proc = subprocess.Popen([*deepsigns_argv(), "train", "--arch", "mlp", "--epochs", "1", "--device", "cpu",
                             "--out", str(out)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while True:  # rank 0 serves the rendezvous's store at MASTER_PORT once it waits there
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1]
            pytest.fail(f"no rendezvous to wait in (exit {proc.returncode}): {err}")
        with socket.socket() as knock:
            if knock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert proc.poll() is None, "an ignored SIGINT ended the rendezvous"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert not out.exists() and partial_files(tmp_path) == []


def _hand_started(rank: int, world: int, port: int, out: Path, address: str = "127.0.0.1") -> subprocess.Popen:
    """`train` as process `rank` of `world`, its torch.distributed variables set by hand (no
    torchrun), the rendezvous's time-out shortened to 6 s."""
    env = process_env({**ENV, "WORLD_SIZE": str(world), "RANK": str(rank), "MASTER_ADDR": address,
                       "MASTER_PORT": str(port)})
    code = ("import deepsigns_cli.defaults as d; d.RENDEZVOUS_SECONDS = 6\n"
            "from deepsigns_cli.cli.main import main; main()")
    return subprocess.Popen([sys.executable, "-c", code, "train", "--arch", "mlp", "--epochs", "1", "--device", "cpu",
                             "--out", str(out)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("case", ["first-alone", "second-alone", "two-of-three", "not-a-store", "no-such-host"])
def test_a_rendezvous_that_never_completes_is_said_and_ends_in_one_line(tmp_path, case):
    """Settings left over from another run, complete (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    the others never started: the process waited 10 minutes without a word, and then ended in a
    C++ stack dump (the first process's store timed out), or printed one at every try to reach
    the first (the others). It says that it waits, and ends with one line at the time-out
    (shortened here). Where two of three came, the second had printed a C++ stack dump as the
    first gave up, and blamed the port; where something else listens at MASTER_PORT (a web
    server), it had waited for ever; a MASTER_ADDR that does not resolve had printed C++
    warnings and stack dumps (helper-64)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "m.safetensors"
    world, ranks, address = {"first-alone": (2, [0], "127.0.0.1"), "second-alone": (2, [1], "127.0.0.1"),
                             "two-of-three": (3, [0, 1], "127.0.0.1"), "not-a-store": (2, [1], "127.0.0.1"),
                             "no-such-host": (2, [0, 1], "a" * 64 + ".invalid")}[case]
    said = {"first-alone": ["waited 6 s for the other processes of its run", "1/2 clients joined"],
            "second-alone": ["waited 6 s for the first process of its run to answer", "none did"],
            "two-of-three": ["start every process of the run"],
            "not-a-store": ["does not answer as the first process of a torch.distributed run"],
            "no-such-host": ["MASTER_ADDR aaaa", "does not resolve", "give the first process's host name"]}[case]
    with socket.socket() as other:
        if case == "not-a-store":  # (it accepts connections and never answers)
            other.bind(("127.0.0.1", port))
            other.listen()
        procs = []
        for rank in ranks:
            procs.append(_hand_started(rank, world, port, out, address))
            time.sleep(1)
        ended = [(rank, *proc.communicate(timeout=120), proc.returncode)
                 for rank, proc in zip(ranks, procs, strict=True)]
    for rank, stdout, stderr, code in ended:
        assert code == 2, stderr
        lines = stderr.splitlines()
        if case != "no-such-host":  # (at once: nothing waits)
            assert lines[0].startswith(f"warning: process {rank} of {world} is waiting for the other processes of "
                                       f"its run at 127.0.0.1:{port}"), stderr
            lines = lines[1:]
        line = assert_one_error_line("".join(line + "\n" for line in lines), stdout, f"process {rank} of {world}",
                                     *said, "unset RANK")
        if case == "two-of-three":  # (the second times out, or sees the first give up first: either, by a hair)
            assert "waited 6 s for the other processes of its run" in line or (
                rank == 1 and "lost the first process of its run" in line), line
    assert list(tmp_path.iterdir()) == []


def test_the_run_steps_keep_the_whole_time_out_whenever_the_first_process_came(monkeypatch):
    """A process that waited for the first to serve the rendezvous gave its steps what was left
    of the rendezvous's time: started 9 minutes early, it would fail any step over a minute."""
    import threading

    import torch.distributed as dist

    from deepsigns_cli import defaults, training

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(defaults, "RENDEZVOUS_SECONDS", 30.0)
    given, first = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: given.append(timeout))
    # (the first process serves the rendezvous's store 2 s after this one began to wait for it)
    late = threading.Timer(2.0, lambda: first.append(dist.TCPStore("127.0.0.1", port, 2, is_master=True,
                                                                   wait_for_workers=False)))
    late.start()
    training._meet("gloo", 1, 2, None)
    late.join()
    assert first and given == [datetime.timedelta(seconds=30)]


def test_a_command_that_runs_in_one_process_is_refused_under_torchrun(tmp_path):
    """`torchrun ... -m deepsigns_cli extract` ran extract in every process: its report printed
    once per process (two JSON objects on stdout with --json), keygen's warnings twice."""
    sample = TESTS.parent / "sample_models" / "digits-mlp.safetensors"
    proc = run_proc("keygen", "--model", sample, "--data", "digits", "--out", tmp_path / "k.dskey", "--json",
                    env={**ENV, **TORCHRUN}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "'keygen' runs in one process", "without torchrun")
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_nproc_inside_torchrun_is_refused(tmp_path):
    """A launcher inside a launched process would start a run per process (a world of one is not
    torchrun: see test_what_a_factory_prints_is_passed_on_and_nothing_is_left_behind)."""
    args = ["train", "--nproc", 2, "--arch", "mlp", "--epochs", 1, "--device", "cpu",
            "--out", tmp_path / "m.safetensors"]
    proc = run_proc(*args, env={**ENV, **TORCHRUN}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "--nproc inside a torchrun process")
    assert list(tmp_path.iterdir()) == []


def _torchrun_failure(rank: int, code: int) -> str:
    """One process's block in torchrun's summary of a failed run."""
    return f"[0]:\n  time      : t\n  host      : localhost\n  rank      : {rank} (local_rank: {rank})\n" \
           f"  exitcode  : {code} (pid: 7)\n  error_file: <N/A>\n"


def _torchrun_summary(other: tuple[int, int], root: tuple[int, int]) -> str:
    return f"Failures:\n{_torchrun_failure(*other)}Root Cause (first observed failure):\n{_torchrun_failure(*root)}"


def test_a_killed_process_is_named_whichever_failure_torchrun_calls_the_root_cause():
    """torchrun may observe a killed process and the one that then failed in the same instant,
    and name either the root cause: the killed one is named all the same."""
    from deepsigns_cli.cli.launch import _killed

    line = "process 1 of 2 was killed by SIGKILL (the out-of-memory killer, or kill -9); nothing was written"
    assert _killed(_torchrun_summary((0, 2), (1, -9)), 2) == line
    assert _killed(_torchrun_summary((1, -9), (0, 2)), 2) == line
    assert _killed(f"Root Cause (first observed failure):\n{_torchrun_failure(0, 2)}", 2) is None


def test_a_silent_process_is_named_whichever_failure_torchrun_calls_the_root_cause():
    """The same for a process that ended with a code and no word (os._exit(7)): the other's
    echo had ended it first in CI, torchrun called that the root cause, and the line named the
    echo's process as the one that said nothing (test_a_process_that_ends_without_a_word_...)."""
    from deepsigns_cli.cli.launch import _exited

    echo = ["process 0 of 2: another process of this run failed (Connection closed by peer); nothing was written"]
    line = "process 1 of 2 ended with exit 7 and no error line"
    assert _exited(_torchrun_summary((0, 2), (1, 7)), echo, 2) == line
    assert _exited(_torchrun_summary((1, 7), (0, 2)), echo, 2) == line
    assert _exited(_torchrun_summary((1, 7), (0, 2)), [], 2) == "process 0 of 2 ended with exit 2 and no error line"
    alone = f"Root Cause (first observed failure):\n{_torchrun_failure(0, 2)}"
    assert _exited(alone, echo, 2) == "process 1 of 2 ended with exit 0 before the run was over, and no error line"
    assert _exited(alone, echo, 3) is None  # (1 or 2: not known)
    assert _exited("", echo, 2) is None  # (no summary: torchrun's agent was killed)
    assert _exited(alone, [], 2) == "process 0 of 2 ended with exit 2 and no error line"
