"""Session fixtures: real tiny models trained once and shared (read-only) by every test.

Tests that change a file (embed rewrites its bundle, --force replaces outputs) copy it into
their own tmp_path first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# One thread per process, in this one and in every process a test starts (the README's examples
# included), unless the caller's environment says otherwise: the models are tiny, and `make
# test` runs two test processes on a 2-core box, where a second thread only fights the other
# process for its core. Set before numpy (OpenBLAS reads it once, when it loads) and torch are
# imported. The whole suite took 511 s with only torch's threads in the test processes held to
# one (torch.set_num_threads below), 445 s with the README's processes on one thread too, and
# 377 s with numpy's as well.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402
from helpers import MESSAGE, PASSPHRASE, SEEDS, run_json  # noqa: E402

# (also in code: torch.set_num_threads, whatever the environment says; it keeps the suite's run
# time steady when other jobs share the machine)
torch.set_num_threads(1)

BASE_EPOCHS = 15

# The files that take a test process a minute or more (as `pytest --durations=0` measured them),
# first: `make test` runs two processes that each take a whole file (`--dist loadfile`) in the
# order of this collection (`--no-loadscope-reorder`), so the two start on the longest files and
# share the short ones out after, instead of one finishing the README's examples alone at the end
# while the other idles (595 s against 530 s for the whole suite, the same code).
LONGEST_FIRST = ("test_readme.py", "test_distributed.py", "test_output.py", "test_robust_output.py",
                 "test_fuzz.py", "test_calibration.py", "test_hidden.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: a file's tests keep their order)


@dataclass(frozen=True)
class MarkedRun:
    """One owner's flow for a seed: baseline -> keygen -> embed -> export."""

    seed: int
    folder: Path
    base: Path  # the unmarked baseline (.safetensors)
    keys: Path  # the bundle, as embed left it
    marked: Path  # the watermarked checkpoint
    onnx: Path  # its ONNX export (deepsigns export)
    train_report: dict
    embed_report: dict


def _made_once(tmp_path_factory, name: str, make) -> tuple[Path, dict]:
    """(folder, facts): the files of a session fixture, made by `make(folder) -> facts (JSON)`
    in the first test process that needs them and shared, read-only, with the other: `make
    test` runs two, and each had trained the same models again (about 30 s of CPU in the
    suite). A process that finds them half made (the other is making them) waits for it."""
    import fcntl
    import json
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # (this session's folder: each test process's own is inside it)
    folder, made = root / f"shared-{name}", root / f"shared-{name}.json"
    with open(root / f"shared-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released as the file closes)
        if made.is_file():
            return folder, json.loads(made.read_text(encoding="utf-8"))
        shutil.rmtree(folder, ignore_errors=True)  # (what a process that failed to make them left)
        folder.mkdir()
        facts = make(folder)
        made.write_text(json.dumps(facts), encoding="utf-8")
        return folder, facts


def _owner_files(folder: Path) -> tuple[Path, Path, Path, Path]:
    """(base, keys, marked, onnx): a marked run's files in its folder."""
    return folder / "base.safetensors", folder / "owner.dskey", folder / "marked.safetensors", folder / "marked.onnx"


def _marked_run(folder: Path, seed: int) -> dict:
    base, keys, marked, onnx = _owner_files(folder)
    train = run_json("train", "--arch", "mlp", "--data", "digits", "--epochs", BASE_EPOCHS,
                     "--seed", seed, "--device", "cpu", "--out", base)
    run_json("keygen", "--model", base, "--data", "digits", "--message", MESSAGE,
             "--seed", seed, "--out", keys)
    embed = run_json("embed", "--model", base, "--data", "digits", "--keys", keys,
                     "--out", marked, "--seed", seed, "--device", "cpu")
    run_json("export", marked, "--out", onnx)
    return {"train": train, "embed": embed}


@pytest.fixture(scope="session")
def marked_runs(tmp_path_factory):
    """seed -> MarkedRun, each made once per session, on first use."""
    cache: dict[int, MarkedRun] = {}

    def get(seed: int) -> MarkedRun:
        if seed not in cache:
            folder, reports = _made_once(tmp_path_factory, f"owner-seed{seed}", lambda f: _marked_run(f, seed))
            cache[seed] = MarkedRun(seed, folder, *_owner_files(folder), reports["train"], reports["embed"])
        return cache[seed]

    return get


@pytest.fixture(scope="session")
def marked(marked_runs) -> MarkedRun:
    """The seed-0 run most tests share."""
    return marked_runs(0)


@pytest.fixture(scope="session", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def seeded_run(request, marked_runs) -> MarkedRun:
    return marked_runs(request.param)


@pytest.fixture(scope="session")
def digits():
    from deepsigns_cli.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def cnn(tmp_path_factory) -> tuple[Path, Path]:
    """A small CNN on the same data: another architecture, same input shape.

    Returns (.safetensors, .onnx).
    """
    def make(folder: Path) -> dict:
        run_json("train", "--arch", "cnn", "--data", "digits", "--epochs", 3, "--seed", 0,
                 "--device", "cpu", "--out", folder / "cnn.safetensors")
        run_json("export", folder / "cnn.safetensors", "--out", folder / "cnn.onnx")
        return {}

    folder, _ = _made_once(tmp_path_factory, "cnn", make)
    return folder / "cnn.safetensors", folder / "cnn.onnx"


@pytest.fixture(scope="session")
def blackbox(tmp_path_factory) -> dict:
    """One owner's black-box files, shared read-only: output-scheme keys (K = 20) embedded into
    a 128-128 MLP. Keys: dir, base/marked (torch models), bundle (opened), and the files
    base.safetensors, marked.safetensors, base.onnx, marked.onnx, owner.dskey in dir."""
    from deepsigns_cli import api
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import load_checkpoint

    def make(folder: Path) -> dict:
        base, keys = folder / "base.safetensors", folder / "owner.dskey"
        api.train("mlp", base, arch_kwargs={"hidden": [128, 128]}, epochs=15, seed=0, device="cpu")
        api.keygen(base, keys, PASSPHRASE, schemes=["output"], options={"key_size": 20}, seed=0)
        api.embed(base, keys, PASSPHRASE, folder / "marked.safetensors", onnx=folder / "marked.onnx", seed=0,
                  device="cpu")
        api.export(base, folder / "base.onnx")
        return {}

    folder, _ = _made_once(tmp_path_factory, "blackbox-owner", make)
    keys, marked = folder / "owner.dskey", folder / "marked.safetensors"
    return {"dir": folder, "keys": keys, "marked_path": marked, "onnx": folder / "marked.onnx",
            "bundle": open_bundle(keys, PASSPHRASE), "base": load_checkpoint(folder / "base.safetensors")[0],
            "marked": load_checkpoint(marked)[0]}
