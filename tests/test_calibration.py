"""The p-value is calibrated: against a model the keys were never embedded in, the fraction of
random key sets with p <= level matches the test's exact size, within a binomial bound.
A p-value that is too small (a forger's friend) or too large (a claim that never holds) fails."""

from __future__ import annotations

from fractions import Fraction
from math import comb, exp, lgamma, log

import numpy as np
import pytest

from deepsigns_cli import api, stats
from deepsigns_cli.results import SchemeKeys
from deepsigns_cli.schemes import output
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


def _calibrated(p_values: list[float], n_bits: int, readings: int = 1) -> list[str]:
    """What is wrong with these p-values (one per random key set), level by level. With several
    readings of one model (Bonferroni: the best of them, p times their number), the size is
    between one reading's and the sum of all of theirs."""
    problems = []
    for level in LEVELS:
        hits = sum(p <= level for p in p_values)
        # one reading's exact size: P[Binomial(N, 1/2) <= e*] for the largest e* that level allows
        size = stats.bits_p_value(stats.max_bit_errors(n_bits, level / readings), n_bits)
        lo = _binomial_interval(len(p_values), size)[0]
        hi = _binomial_interval(len(p_values), min(1.0, size * readings))[1]
        if not lo <= hits <= hi or hits > _binomial_interval(len(p_values), level)[1]:
            problems.append(f"{hits} of {len(p_values)} with p <= {level}: expected {lo}..{hi}")
    return problems


@pytest.mark.parametrize("n_bits, classes", [(16, 1), (8, 3)])
def test_hidden_p_values_are_calibrated_on_an_unmarked_model(marked, digits, n_bits, classes):
    """One class centre, and the default three (each read through its own projection: the
    copies are independent evidence under the null, so p counts all 3 x N bits)."""
    from deepsigns_cli.checkpoint import load_checkpoint

    model, info = load_checkpoint(marked.base)  # never marked: the owner's baseline
    suspect = TorchSuspect(model)
    p_values = []
    for seed in range(KEY_SETS):
        bundle = api.make_keys(model, info, digits, ["hidden"], {"hidden": {"bits": n_bits, "classes": classes}},
                               seed=seed)
        result = api.read_keys(suspect, bundle, ["hidden"], alpha=LEVEL).results[0]
        assert result.n_bits == n_bits * classes
        assert result.readings == 3  # the units as they are, and lined up with the unmarked model's (over
        # their scales, and over their offsets too)
        p_values.append(result.p_value)
    n_bits *= classes
    assert _calibrated(p_values, n_bits, readings=3) == []


def test_the_check_catches_a_miscalibrated_p_value():
    """The check above can fail: p-values four times too small, or stuck at 1, are caught."""
    errors = np.random.default_rng(0).binomial(32, 0.5, KEY_SETS)
    honest = [stats.bits_p_value(e, 32) for e in errors]
    assert _calibrated(honest, 32) == []
    assert _calibrated([p / 4 for p in honest], 32) != []
    assert _calibrated([1.0] * KEY_SETS, 32) != []


# ---------------------------------------------------------------------------- output scheme
# p = P[Binomial(K, 1/(C - 1)) >= matches]. A key's label is uniform over the C - 1 classes the owner's
# unmarked model does not give it, so an unrelated model matches a key with probability
# r = (how often it disagrees with the owner's model on keys) / (C - 1): at most 1/(C - 1), and
# not known in advance. So the test's exact size is not known either: it is computed from the
# match rate the key sets show, r being bounded by its own binomial interval. Matches are
# independent across keys (each key's input and label are drawn on their own), so the matches of
# a key set are Binomial(K, r) and the hits at a level are Binomial(n, P[Binomial(K, r) >= m*]),
# m* the fewest matches the test claims at that level.

OUTPUT_KEYS = 20  # the p-value is one function of (K, matches): K = 20 lets the check see every level


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    return lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1) + k * log(p) + (n - k) * log(1 - p)


def _binomial_at_least(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= k]."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    if n - k < k:  # sum the shorter side
        return min(1.0, sum(exp(_log_binomial_pmf(i, n, p)) for i in range(k, n + 1)))
    return max(0.0, 1 - sum(exp(_log_binomial_pmf(i, n, p)) for i in range(k)))


def _rate_interval(successes: int, trials: int, tail: float = 1e-4) -> tuple[float, float]:
    """[lo, hi] holding a Bernoulli rate given Binomial(trials, rate) = successes, except with
    probability 2 * tail at most (exact tails, bisection)."""

    def solve(too_far) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if too_far(mid) else (mid, hi)
        return (lo + hi) / 2

    r_lo = 0.0 if successes == 0 else solve(lambda r: _binomial_at_least(successes, trials, r) > tail)
    r_hi = 1.0 if successes == trials else solve(lambda r: 1 - _binomial_at_least(successes + 1, trials, r) < tail)
    return r_lo, r_hi


def _output_calibrated(p_values: list[float], matches: list[int], n_keys: int, labels: int) -> list[str]:
    """What is wrong with these p-values (one per random key set, with its matches), level by level.
    `labels`: the labels a key's label is drawn among (C - 1)."""
    n, problems = len(p_values), []
    r_lo, r_hi = _rate_interval(sum(matches), n * n_keys)
    if r_lo > 1 / labels:  # no unrelated model can match keys more often than this
        problems.append(f"{sum(matches)} matches of {n * n_keys} keys: more than 1/(C - 1) of them")
    for level in LEVELS:
        hits = sum(p <= level for p in p_values)
        fewest = n_keys - stats.max_mismatches(n_keys, labels, level)  # m*: the fewest matches claimed
        lo = _binomial_interval(n, _binomial_at_least(fewest, n_keys, r_lo))[0]
        # the exact size at the observed rate, and never above the level itself (the bound)
        hi = min(_binomial_interval(n, _binomial_at_least(fewest, n_keys, r_hi))[1],
                 _binomial_interval(n, level)[1])
        if not lo <= hits <= hi:
            problems.append(f"{hits} of {n} with p <= {level}: expected {lo}..{hi} "
                            f"(per-key match rate {r_lo:.4f}..{r_hi:.4f})")
    return problems


class _SameRegions:
    """keygen's density model of the training activations (an SVD, most of keygen's time) is a
    function of the model and its training data alone when the data has no more points than the
    reference sample: no random subsample, the rng is not touched. Built once, it is the very
    object keygen would build for every key set; the key inputs and labels still come from each
    key set's own seeded rng in the library's keygen."""

    def __init__(self):
        self.made: tuple[np.ndarray, dict, output.RareRegions] | None = None
        self.build = output.RareRegions  # the library's own class (the module name gets patched)

    def __call__(self, train_acts, opts, rng):
        if len(train_acts) > opts["reference_points"]:  # keygen would subsample: not the same object
            return self.build(train_acts, opts, rng)
        if self.made is None or not (np.array_equal(train_acts, self.made[0]) and opts == self.made[1]):
            self.made = (train_acts.copy(), dict(opts), self.build(train_acts, opts, rng))
        return self.made[2]


def _as_embedded(keys: SchemeKeys) -> SchemeKeys:
    """The key set as embed would leave it, minus the training: K of the candidates, chosen without
    looking at them (the candidates are drawn independently, so the first K are a random key set)."""
    k = int(keys.params["key_size"])
    return SchemeKeys(keys.scheme, {**keys.params, "embedded": True},
                      {"x": keys.arrays["x_candidates"][:k], "y": keys.arrays["y_candidates"][:k]})


def test_output_p_values_are_calibrated_on_unmarked_models(marked, digits, cnn, monkeypatch):
    from deepsigns_cli.checkpoint import load_checkpoint

    owner, info = load_checkpoint(marked.base)  # the keys are drawn on the owner's unmarked baseline
    # read from models that never saw the keys: an MLP like the owner's (another seed), and a CNN
    other_mlp = api.train_model("mlp", digits, epochs=15, seed=1, device="cpu")[0]
    suspects = {"mlp seed 1": TorchSuspect(other_mlp), "cnn": TorchSuspect(load_checkpoint(cnn[0])[0])}
    monkeypatch.setattr(output, "RareRegions", _SameRegions())
    p_values: dict[str, list[float]] = {name: [] for name in suspects}
    matches: dict[str, list[int]] = {name: [] for name in suspects}
    for seed in range(KEY_SETS):
        bundle = api.make_keys(owner, info, digits, ["output"], {"output": {"key_size": OUTPUT_KEYS}}, seed=seed)
        bundle.put(_as_embedded(bundle.schemes["output"]))
        for name, suspect in suspects.items():
            result = api.read_keys(suspect, bundle, ["output"], alpha=LEVEL).results[0]
            p_values[name].append(result.p_value)
            matches[name].append(result.matches)
    problems = {name: _output_calibrated(p_values[name], matches[name], OUTPUT_KEYS, info.num_classes - 1)
                for name in suspects}
    assert problems == {name: [] for name in suspects}


@pytest.mark.parametrize("rate", [0.075, 1 / 9])  # about the CNN's match rate; the worst case 1/(C - 1)
def test_the_output_check_catches_a_miscalibrated_p_value(rate):
    """The output check can fail: p-values four times too small, or stuck at 1, are caught."""
    matches = [int(m) for m in np.random.default_rng(0).binomial(OUTPUT_KEYS, rate, KEY_SETS)]
    honest = [stats.matches_p_value(m, OUTPUT_KEYS, 9) for m in matches]  # C = 10: 9 labels a key can have
    assert _output_calibrated(honest, matches, OUTPUT_KEYS, 9) == []
    assert _output_calibrated([p / 4 for p in honest], matches, OUTPUT_KEYS, 9) != []
    assert _output_calibrated([1.0] * KEY_SETS, matches, OUTPUT_KEYS, 9) != []


# ----------------------------------------------------------------- keys drawn from a chosen pool


def _steered_p_values(seed: int, trials: int, candidates: int, pool: int, keys: int, labels: int):
    """(counted, uncounted) p-values of K keys drawn at random from a pool chosen by the worst
    adversary: every candidate whose label the model hits (each with chance 1/labels) is put in
    the pool first, as data that taught embed's thief-copy another model's answers had done."""
    rng = np.random.default_rng(seed)
    counted = stats.chosen_matches_p_values(keys, labels, candidates, pool)
    got = []
    for _ in range(trials):
        hits = rng.random(candidates) < 1 / labels
        order = np.concatenate([np.flatnonzero(hits), rng.permutation(np.flatnonzero(~hits))])
        kept = order[:pool]
        m = int(hits[rng.choice(kept, size=keys, replace=False)].sum())
        got.append((counted[m], stats.matches_p_value(m, keys, labels)))
    return [c for c, _ in got], [u for _, u in got]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keys_drawn_from_a_chosen_pool_count_the_choice(seed):
    """embed draws output keys among those that last; a forger who steered which last had 59 of
    200 keys claim a model at p = 1.3e-12 with the choice uncounted. Counted at its worst,
    p <= level at most as often as the level says, under the very adversary that made the
    uncounted p-value claim at will."""
    counted, uncounted = _steered_p_values(seed, KEY_SETS, candidates=120, pool=40, keys=20, labels=9)
    for level in (0.01, 0.05, 0.25):
        _, hi = _binomial_interval(len(counted), level)
        assert sum(p <= level for p in counted) <= hi, level
    assert sum(p <= 0.01 for p in uncounted) > 0.5 * len(uncounted)  # (the adversary is real)


def test_a_pool_of_every_candidate_counts_nothing():
    for keys, labels in ((20, 9), (100, 9), (7, 2)):
        chosen = stats.chosen_matches_p_values(keys, labels, 4 * keys, 4 * keys)
        for m in range(keys + 1):
            assert chosen[m] == pytest.approx(stats.matches_p_value(m, keys, labels), rel=1e-9, abs=1e-300)


def _exact_chosen(keys: int, labels: int, candidates: int, pool: int, m: int) -> Fraction:
    """chosen_matches_p_values' p for m matches, in exact arithmetic: M ~ Binomial(candidates,
    1/labels) hits among the candidates, min(M, pool) of them in the pool, K keys drawn from it."""
    total = Fraction(0)
    for hits in range(candidates + 1):
        weight = Fraction(comb(candidates, hits) * (labels - 1) ** (candidates - hits), labels**candidates)
        a = min(hits, pool)
        drawn = sum(comb(a, j) * comb(pool - a, keys - j) for j in range(m, min(a, keys) + 1))
        total += weight * Fraction(drawn, comb(pool, keys))
    return total


def test_no_p_value_is_reported_below_the_exact_one():
    """Rounded to nearest, a p-value (and its product by the tries) could come out half a unit
    in the last place below the exact one, and detect at an alpha a hair below it (64 bits, 22
    wrong, at alpha = 0.008429095022140565); far below the floats' range it came out 0 ('a
    forger would have to try about inf key sets'). Each is now the float at or above it."""
    for n in (1, 7, 64, 192):
        for errors in range(n + 1):
            exact = Fraction(sum(comb(n, i) for i in range(errors + 1)), 2**n)
            for tries in (1, 2, 3, 10):
                p = stats.bonferroni(stats.bits_p_value(errors, n), tries)
                assert Fraction(p) >= min(exact * tries, 1), (n, errors, tries)
    exact = Fraction(sum(comb(64, i) for i in range(23)), 2**64)
    assert exact > Fraction(0.008429095022140565) and stats.bits_p_value(22, 64) > 0.008429095022140565
    for keys, labels in ((20, 9), (100, 9), (7, 2)):
        for m in range(keys + 1):
            exact = Fraction(sum(comb(keys, i) * (labels - 1) ** (keys - i) for i in range(m, keys + 1)), labels**keys)
            assert Fraction(stats.matches_p_value(m, keys, labels)) >= exact, (keys, labels, m)
    for keys, labels, candidates, pool in ((5, 2, 20, 12), (8, 9, 40, 30), (10, 3, 30, 10)):
        p = stats.chosen_matches_p_values(keys, labels, candidates, pool)
        for m in range(1, keys + 1):
            exact = _exact_chosen(keys, labels, candidates, pool, m)
            assert Fraction(p[m]) >= exact and p[m] <= float(exact) * (1 + 1e-9) + 5e-324, (keys, pool, m)
    assert stats.bits_p_value(0, 1536) == stats.matches_p_value(340, 340, 9) == 5e-324  # (not 0)


def test_a_p_value_is_shown_rounded_up():
    """A p just above alpha had shown as alpha (1.0007e-09 as 1e-09, beside NOT DETECTED at
    alpha 1e-09); the smallest p had read 'a forger would have to try about inf key sets'."""
    from deepsigns_cli.cli.render import fmt_p
    from deepsigns_cli.results import MatchResult, decide

    assert [fmt_p(p) for p in (1.0007e-9, 1e-9, 0.5, 9.996e-5, 2.23e-57, 1.0)] == \
        ["1.01e-09", "1e-09", "0.5", "0.0001", "2.23e-57", "1"]
    tiny = decide([MatchResult("output", stats.bits_p_value(0, 1536), keys=20, num_classes=10)], 1e-9,
                  command="verify", model="m", key_id="k")
    assert tiny.detected and "a forger would have to try more than 1e+308 random key sets" in tiny.meaning()


# ----------------------------------------------------------------- answers read relabelled


def _renumbering_null(rng, keys: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(answers, key labels) of a model that never saw the keys, at the worst the scheme allows:
    it gives every key the unmarked model's own answer, and each key's label was drawn among the
    C - 1 others. Read as answered, no key matches; some relabelling of the classes matches many
    (each answer class to the key label most of its keys have)."""
    own = rng.integers(0, classes, keys)
    return own, (own + rng.integers(1, classes, keys)) % classes


@pytest.mark.parametrize("keys, classes", [(20, 3), (12, 4), (20, 10)])
def test_the_relabelled_reading_is_calibrated(keys, classes):
    """The output scheme also reads a suspect's answers through the relabelling of the classes
    that matches the most keys (a thief may renumber them). That best relabelling is a search
    over C! of them: counted (and given 1% of alpha), p <= level at most as often as the level
    says on answers that owe nothing to the keys; uncounted, it claims them often."""
    rng = np.random.default_rng(keys * classes)
    counted, uncounted = [], []
    for _ in range(KEY_SETS):
        answers, labels = _renumbering_null(rng, keys, classes)
        found, _, p, _ = output._either_reading(answers, labels, classes, classes - 1, None)
        counted.append(p)
        table = np.zeros((classes, classes), np.int64)
        np.add.at(table, (answers, labels), 1)
        best = int(table.max(1).sum())  # (an upper bound on any relabelling's matches: at least `found`)
        assert found <= best
        uncounted.append(stats.matches_p_value(best, keys, classes - 1))
    for level in LEVELS:
        _, hi = _binomial_interval(KEY_SETS, level)
        assert sum(p <= level for p in counted) <= hi, level
    if classes <= 4:  # (the search is real: uncounted, the best relabelling claims these answers)
        assert sum(p <= 0.25 for p in uncounted) > 0.5 * KEY_SETS


def test_a_renumbered_copy_of_the_keys_answers_is_read_relabelled():
    """Answers that are the keys' labels renumbered (a permuted head, or ids of the thief's own)
    read every key through the inverse renumbering, at the relabelled reading's p-value: one of
    C! / (C - D)! relabellings of the D values answered; as answered, they are not found."""
    rng = np.random.default_rng(0)
    for keys, classes in ((100, 10), (40, 5), (60, 50)):
        labels = rng.integers(0, classes, keys)
        perm = rng.permutation(classes)
        shown = len(set(labels.tolist()))
        for answers in (perm[labels], perm[labels] * 7 + 10**15):  # (class numbers; ids of his own)
            found, moved, p, values = output._either_reading(answers, labels, classes, classes - 1, None)
            assert found == keys and values == shown, (keys, classes)
            assert p == stats.relabelled(stats.matches_p_value(keys, keys, classes - 1), classes, shown)
            want = {(int(answers[labels == b][0]), int(b)) for b in set(labels.tolist())}
            assert sorted(map(tuple, moved)) == sorted((a, b) for a, b in want if a != b)
            as_answered = stats.as_answered(stats.matches_p_value(int((answers == labels).sum()), keys, classes - 1))
            assert p < 1e-9 < as_answered


def test_a_search_beyond_the_floats_range_counts_as_p_1():
    """C! for 171 classes or more passes the floats' range: a p-value counted over so many
    relabellings (or tries) is 1, never an overflow (a bundle of 176 classes had crashed verify)."""
    from math import factorial, perm

    assert stats.bonferroni(1e-12, factorial(176)) == 1.0 and stats.bonferroni(0.5, 10**400) == 1.0
    assert stats.relabelled(0.5, 171, 171) == stats.relabelled(1e-12, 176, 176) == 1.0
    assert stats.relabelled(1e-300, 176, 3) == pytest.approx(1e-300 * perm(176, 3) * 100, rel=1e-12)
