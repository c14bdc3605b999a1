"""The p-value is calibrated: against a model the keys were never embedded in, the fraction of
random key sets with p <= level matches the test's exact size, within a binomial bound.
A p-value that is too small (a forger's friend) or too large (a claim that never holds) fails."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from deepsigns_cli import api, stats
from deepsigns_cli.suspect import TorchSuspect

KEY_SETS = 600
LEVEL = 0.01  # the level the issue names
LEVELS = (LEVEL, 0.1, 0.25)  # more levels: a p-value stuck high shows where claims are common


def _binomial_interval(n: int, p: float, tail: float = 1e-4) -> tuple[int, int]:
    """[lo, hi] holding a Binomial(n, p) count except with probability 2 * tail at most."""
    pmf = [comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, acc = 0, 0.0
    while acc + pmf[lo] <= tail:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while acc + pmf[hi] <= tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


def _calibrated(p_values: list[float], n_bits: int) -> list[str]:
    """What is wrong with these p-values (one per random key set), level by level."""
    problems = []
    for level in LEVELS:
        hits = sum(p <= level for p in p_values)
        # the test's exact size: P[Binomial(N, 1/2) <= e*] for the largest e* that level allows
        size = stats.bits_p_value(stats.max_bit_errors(n_bits, level), n_bits)
        lo, hi = _binomial_interval(len(p_values), size)
        if not lo <= hits <= hi or hits > _binomial_interval(len(p_values), level)[1]:
            problems.append(f"{hits} of {len(p_values)} with p <= {level}: expected {lo}..{hi}")
    return problems


@pytest.mark.parametrize("n_bits", [16, 32])
def test_hidden_p_values_are_calibrated_on_an_unmarked_model(marked, digits, n_bits):
    from deepsigns_cli.checkpoint import load_checkpoint

    model, info = load_checkpoint(marked.base)  # never marked: the owner's baseline
    suspect = TorchSuspect(model)
    p_values = []
    for seed in range(KEY_SETS):
        bundle = api.make_keys(model, info, digits, ["hidden"], {"hidden": {"bits": n_bits}}, seed=seed)
        p_values.append(api.read_keys(suspect, bundle, ["hidden"], alpha=LEVEL).results[0].p_value)
    assert _calibrated(p_values, n_bits) == []


def test_the_check_catches_a_miscalibrated_p_value():
    """The check above can fail: p-values four times too small, or stuck at 1, are caught."""
    errors = np.random.default_rng(0).binomial(32, 0.5, KEY_SETS)
    honest = [stats.bits_p_value(e, 32) for e in errors]
    assert _calibrated(honest, 32) == []
    assert _calibrated([p / 4 for p in honest], 32) != []
    assert _calibrated([1.0] * KEY_SETS, 32) != []
