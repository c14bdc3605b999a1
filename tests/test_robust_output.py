"""The black-box mark outlives a thief's fine-tuning: keys learnt at the model's own rate, deepened,
and drawn among those a simulated fine-tune of a copy did not take back. And the choice does not
make unrelated models match: they stay far below the detection line."""

from __future__ import annotations

import pytest
from helpers import PASSPHRASE, SEEDS, run_json

from deepsigns_cli import api


@pytest.fixture(scope="module")
def owners(tmp_path_factory) -> dict:
    """seed -> (folder, base, keys, marked, embed's report): output-scheme keys at the defaults
    (K = 100) in the default MLP (64-512-512-10)."""
    out = {}
    for seed in SEEDS:
        folder = tmp_path_factory.mktemp(f"bb-owner{seed}")
        base, keys, marked = folder / "base.safetensors", folder / "owner.dskey", folder / "marked.safetensors"
        api.train("mlp", base, epochs=30, seed=seed, device="cpu")  # (as the sample model: fidelity is about it)
        api.keygen(base, keys, PASSPHRASE, schemes=["output"], seed=seed)
        report = api.embed(base, keys, PASSPHRASE, marked, seed=seed, device="cpu")
        out[seed] = (folder, base, keys, marked, report)
    return out


def test_marked_detected_unmarked_not(owners):
    """The public code compares matches as if they were mismatches; we must not. And the keys
    cost the model no more than a point of test accuracy (fidelity)."""
    for seed, (_, base, keys, marked, report) in owners.items():
        on_marked, on_base = (api.extract(model, keys, PASSPHRASE).results[0] for model in (marked, base))
        assert on_marked.matches == on_marked.keys and on_marked.detected, seed
        assert on_base.matches <= 2 and not on_base.detected, seed
        assert on_marked.p_value < 1e-6 < on_base.p_value, seed
        assert report.accuracy_after >= report.accuracy_before - 1.0, seed


def test_the_keys_are_drawn_among_those_that_last(owners):
    from deepsigns_cli.bundle import open_bundle

    for _, _, keys, _, _ in owners.values():
        params = open_bundle(keys, PASSPHRASE).schemes["output"].params
        assert params["key_size"] == 100 and params["lasting"] >= 100 and params["robust_epochs"] == 30


def test_fine_tuning_at_the_training_rate_leaves_the_mark(owners):
    """30 epochs of Adam at the rate the model was trained with (the issue's attack): the mark
    is still detected in at least 2 of 3 seeds (before this design: 0 of 3)."""
    detected, matches = 0, []
    for seed, (folder, _, keys, marked, _) in owners.items():
        tuned = folder / "tuned.safetensors"
        report = run_json("attack", "finetune", "--model", marked, "--epochs", 30, "--seed", seed + 7,
                          "--device", "cpu", "--out", tuned)
        assert report["accuracy_after"] > report["accuracy_before"] - 2  # an attack that costs nothing
        run_json("export", tuned, "--out", folder / "tuned.onnx")
        verdict = run_json("verify", "--model", folder / "tuned.onnx", "--keys", keys, code=None)
        matches.append(verdict["results"][0]["matches"])
        detected += verdict["detected"]
    assert detected >= 2, f"matches after fine-tuning: {matches} (35 of 100 needed)"


def test_unrelated_models_do_not_match_the_chosen_keys(owners, tmp_path):
    """The choice favours labels the architecture finds natural at a key; another owner's
    model (same architecture and data) must still sit far below the line."""
    seeds = list(owners)
    for seed in seeds:
        _, _, keys, _, _ = owners[seed]
        other = owners[seeds[(seeds.index(seed) + 1) % len(seeds)]][1]
        onnx = tmp_path / f"other{seed}.onnx"
        run_json("export", other, "--out", onnx)
        verdict = run_json("verify", "--model", onnx, "--keys", keys, code=1)
        assert verdict["results"][0]["matches"] <= 20  # 35 detect; 100/9 = 11 is chance at worst
