"""Fuzzing inside the suite: a few hundred mutated bundles, checkpoints, ONNX files, .npz files,
pickles and option values, run through every command in-process (see tests/fuzzing.py for the
generator and the oracle; `make fuzz` runs the long campaign).

Every case must end in exit 0/1 with one valid JSON report, or exit 2 with one "error: " line;
never a traceback, an internal error (exit 3), a hang, a partial output, a changed input or
code run because a file asked for it. The seed is fixed so that a failure here is
reproducible: `.venv/bin/python scripts/fuzz.py --seed SEED --only INDEX --keep`.
"""

from __future__ import annotations

import os
import time

import fuzzing
import pytest

CASES = int(os.environ.get("DEEPSIGNS_FUZZ_CASES", "500"))
SEED = int(os.environ.get("DEEPSIGNS_FUZZ_SEED", "2026"))
BUDGET = 20.0  # seconds per case


@pytest.fixture(scope="session")
def fuzz_artefacts(tmp_path_factory):
    """A tiny MLP, its keys, exports and data, made once (a few seconds)."""
    return fuzzing.build_artefacts(tmp_path_factory.mktemp("fuzz-artefacts"))


@pytest.mark.slow  # about 20 s: in `make test`, not in `make test-fast`
def test_fuzz_every_command(fuzz_artefacts, tmp_path):
    start = time.monotonic()
    results = fuzzing.run_campaign(SEED, range(CASES), fuzz_artefacts, tmp_path / "cases", budget=BUDGET,
                                   workers=min(2, os.cpu_count() or 1))
    elapsed = time.monotonic() - start
    summary = fuzzing.format_summary(results, elapsed)
    print("\n" + summary)
    assert len(results) == CASES, summary
    failing = [r for r in results if r["failures"]]
    assert not failing, (f"{summary}\n\n{fuzzing.format_failures(results)}\n\n"
                         f"reproduce: .venv/bin/python scripts/fuzz.py --seed {SEED} --only INDEX --keep")


def _selftest(artefacts, tmp_path, indices, budget, grace=2.0):
    results = fuzzing.run_campaign(0, indices, artefacts, tmp_path / "cases", budget=budget,
                                   families=["selftest"], grace=grace)
    assert [r["index"] for r in results] == list(indices)
    for r in results:
        want = set(fuzzing.SELFTESTS[r["index"]][0])
        assert set(r["failures"]) == want, (r["mutation"], r["failures"], r["detail"])


def test_the_oracle_sees_code_runs_partial_outputs_changed_inputs_leaks_and_hangs(fuzz_artefacts, tmp_path):
    """Cases that are bad on purpose (a --arch chosen on the command line runs code): the oracle
    reports each, and a clean case reports nothing."""
    _selftest(fuzz_artefacts, tmp_path, range(7), budget=2.0)


@pytest.mark.slow
def test_the_supervisor_sees_native_hangs_and_crashes(fuzz_artefacts, tmp_path):
    """A hang that SIGALRM cannot reach (inside a C call) and a worker that dies are counted
    and the campaign goes on."""
    _selftest(fuzz_artefacts, tmp_path, range(7, len(fuzzing.SELFTESTS)), budget=2.0)
