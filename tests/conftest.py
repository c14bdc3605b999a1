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


def _marked_run(folder: Path, seed: int) -> MarkedRun:
    base, keys = folder / "base.safetensors", folder / "owner.dskey"
    marked, onnx = folder / "marked.safetensors", folder / "marked.onnx"
    train = run_json("train", "--arch", "mlp", "--data", "digits", "--epochs", BASE_EPOCHS,
                     "--seed", seed, "--device", "cpu", "--out", base)
    run_json("keygen", "--model", base, "--data", "digits", "--message", MESSAGE,
             "--seed", seed, "--out", keys)
    embed = run_json("embed", "--model", base, "--data", "digits", "--keys", keys,
                     "--out", marked, "--seed", seed, "--device", "cpu")
    run_json("export", marked, "--out", onnx)
    return MarkedRun(seed, folder, base, keys, marked, onnx, train, embed)


@pytest.fixture(scope="session")
def marked_runs(tmp_path_factory):
    """seed -> MarkedRun, each made once per session, on first use."""
    cache: dict[int, MarkedRun] = {}

    def get(seed: int) -> MarkedRun:
        if seed not in cache:
            cache[seed] = _marked_run(tmp_path_factory.mktemp(f"owner-seed{seed}"), seed)
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
    folder = tmp_path_factory.mktemp("cnn")
    ckpt, onnx = folder / "cnn.safetensors", folder / "cnn.onnx"
    run_json("train", "--arch", "cnn", "--data", "digits", "--epochs", 3, "--seed", 0,
             "--device", "cpu", "--out", ckpt)
    run_json("export", ckpt, "--out", onnx)
    return ckpt, onnx


@pytest.fixture(scope="session")
def blackbox(tmp_path_factory) -> dict:
    """One owner's black-box files, shared read-only: output-scheme keys (K = 20) embedded into
    a 128-128 MLP. Keys: dir, base/marked (torch models), bundle (opened), and the files
    base.safetensors, marked.safetensors, base.onnx, marked.onnx, owner.dskey in dir."""
    from deepsigns_cli import api
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import load_checkpoint

    folder = tmp_path_factory.mktemp("blackbox-owner")
    base, keys, marked = folder / "base.safetensors", folder / "owner.dskey", folder / "marked.safetensors"
    api.train("mlp", base, arch_kwargs={"hidden": [128, 128]}, epochs=15, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["output"], options={"key_size": 20}, seed=0)
    api.embed(base, keys, PASSPHRASE, marked, onnx=folder / "marked.onnx", seed=0, device="cpu")
    api.export(base, folder / "base.onnx")
    return {"dir": folder, "keys": keys, "marked_path": marked, "onnx": folder / "marked.onnx",
            "bundle": open_bundle(keys, PASSPHRASE), "base": load_checkpoint(base)[0],
            "marked": load_checkpoint(marked)[0]}
