"""Exact binomial tails, p-values and decision thresholds (integer arithmetic, no approximations;
the count of a chosen pool of keys alone in floating point: see chosen_matches_p_values)."""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from math import comb, inf, isfinite, lgamma, log, log1p, nextafter, perm

__all__ = [
    "bits_p_value",
    "matches_p_value",
    "max_bit_errors",
    "max_mismatches",
    "chosen_matches_p_values",
    "bonferroni",
    "as_answered",
    "keys_p_value",
    "relabelled",
    "RELABEL_SHARE",
    "smallest_bits_p_value",
    "check_alpha",
    "MAX_BITS",
]


#: the bits a reading counts at most (the output scheme's keys have their own, lower bound): the
#: exact tail over 4,096 takes about a second, over 16,384 half a minute, outside any bound
MAX_BITS = 4096


#: the relative error of chosen_matches_p_values' floating point (log-gamma) is below 1e-12
#: against exact sums (up to 400 keys among 1,600 candidates): its p-values are raised by this
#: much, so that none is reported below the exact one
_CHOSEN_MARGIN = 1e-10


def _at_least(value: Fraction) -> float:
    """`value` as the nearest float at or above it: a p-value is never reported below the
    exact one (rounding to nearest had, by half a unit in the last place, sometimes detected
    at an alpha a hair below the exact p), nor as 0 below the floats' range (5e-324 then)."""
    rounded = float(value)
    return nextafter(rounded, inf) if Fraction(rounded) < value else rounded


def bits_p_value(errors: int, n_bits: int) -> float:
    """P[Binomial(N, 1/2) <= errors]: the chance that an unrelated model matches this well."""
    if errors < 0:
        return 0.0
    if errors >= n_bits:
        return 1.0
    return _at_least(Fraction(sum(comb(n_bits, i) for i in range(errors + 1)), 2**n_bits))


def smallest_bits_p_value(n_bits: int) -> float:
    """The best p-value N bits can give (all bits right): 2^-N."""
    return bits_p_value(0, n_bits)


def _upper_tail_counts(n_keys: int, n_classes: int) -> list[int]:
    """tail[m] * C^-K = P[Binomial(K, 1/C) >= m], for m = 0..K+1, in one pass."""
    tail = [0] * (n_keys + 2)
    for m in range(n_keys, -1, -1):
        tail[m] = tail[m + 1] + comb(n_keys, m) * (n_classes - 1) ** (n_keys - m)
    return tail


def matches_p_value(matches: int, n_keys: int, n_classes: int, chosen: tuple[int, int] | None = None) -> float:
    """P[Binomial(K, 1/C) >= m]: the chance that an unrelated model hits m of K key labels, each
    drawn among C labels (the output scheme passes C - 1: the labels a key can have). `chosen`:
    (candidates, pool) when the K keys were drawn from a pool chosen among candidates, a choice
    counted at its worst (chosen_matches_p_values)."""
    if chosen is not None and n_classes >= 2 and matches > 0:
        return chosen_matches_p_values(n_keys, n_classes, *chosen)[min(matches, n_keys)]
    if matches <= 0:
        return 1.0
    if matches > n_keys:
        return 0.0
    tail = sum(comb(n_keys, i) * (n_classes - 1) ** (n_keys - i) for i in range(matches, n_keys + 1))
    return _at_least(Fraction(tail, n_classes**n_keys))


def max_bit_errors(n_bits: int, alpha: float) -> int:
    """The largest number of bit errors still detected at alpha (-1 when none is); one pass."""
    check_alpha(alpha)
    total, cdf, worst = 2**n_bits, 0, -1
    bound = Fraction(alpha)  # exact: compare integers, never rounded floats
    for e in range(n_bits + 1):
        cdf += comb(n_bits, e)
        if Fraction(cdf, total) > bound:
            break
        worst = e
    return worst


def max_mismatches(n_keys: int, n_classes: int, alpha: float, chosen: tuple[int, int] | None = None) -> int:
    """The paper's Eq. 5 threshold: the most mismatches still detected at alpha (-1 when none);
    `chosen` as in matches_p_value."""
    check_alpha(alpha)
    if chosen is not None and n_classes >= 2:
        p = chosen_matches_p_values(n_keys, n_classes, *chosen)
        return max((n_keys - m for m in range(n_keys + 1) if p[m] <= alpha), default=-1)
    tail, total, bound = _upper_tail_counts(n_keys, n_classes), n_classes**n_keys, Fraction(alpha)
    worst = -1
    for mism in range(n_keys + 1):  # K - mism matches
        if Fraction(tail[n_keys - mism], total) > bound:
            break
        worst = mism
    return worst


@lru_cache(maxsize=32)  # (each output of a suspect, then the threshold: the same table)
def chosen_matches_p_values(n_keys: int, n_classes: int, candidates: int, pool: int) -> tuple[float, ...]:
    """p-values for m = 0..K matches of K keys drawn at random from a `pool` of `candidates`
    chosen by a test that may favour the labels an unrelated model gives (the output scheme's
    keys that last): the worst case, every candidate whose label the model hits (each with
    chance 1/C) in the pool. Sum over M ~ Binomial(candidates, 1/C) of P[Hypergeometric(pool,
    min(M, pool), K) >= m]. In floating point (log-gamma), one (pool x K) table: exact integers
    would cost minutes at the largest key sets: its values are raised by _CHOSEN_MARGIN, more
    than its rounding, and none is below the floats' smallest, 5e-324)."""
    import numpy as np

    k, n = n_keys, candidates
    if not (1 <= k <= pool <= n and n_classes >= 2):
        raise ValueError(f"keys {k}, pool {pool}, candidates {n} and classes {n_classes}: need "
                         "1 <= keys <= pool <= candidates and 2 classes or more")
    log_factorial = np.array([lgamma(i + 1) for i in range(n + 1)])

    def log_comb(a, b):  # (0 <= b <= a <= n, elementwise)
        return log_factorial[a] - log_factorial[b] - log_factorial[a - b]

    hits = np.arange(n + 1)
    weight = np.exp(log_comb(n, hits) - hits * log(n_classes) + (n - hits) * log1p(-1 / n_classes))
    in_pool = weight[: pool + 1].copy()
    in_pool[pool] = weight[pool:].sum()  # (as many hits as the pool holds, or more: all of it hits)
    a = np.arange(pool + 1)[:, None]  # hits in the pool
    j = np.arange(k + 1)[None, :]  # of them among the K drawn
    possible = (j <= a) & (k - j <= pool - a)
    log_pmf = np.where(possible, log_comb(a, np.minimum(j, a)) + log_comb(pool - a, np.clip(k - j, 0, pool - a))
                       - log_comb(pool, k), -np.inf)
    tail = np.cumsum(np.exp(log_pmf)[:, ::-1], axis=1)[:, ::-1]  # P[drawn hits >= m], m = 0..K
    return (1.0, *(min(1.0, max(float(p) * (1 + _CHOSEN_MARGIN), 5e-324)) for p in (in_pool @ tail)[1:]))


def most_detected(limit: int, p_of, alpha: float) -> int:
    """The largest count k in 0..limit (bit errors, key mismatches) whose p-value `p_of(k)`,
    nondecreasing in k, is at most alpha; -1 when none is. `p_of` is the float a reading's own
    p-value is computed as, so that a report's threshold and its verdict agree to the last bit
    (the exact tail had given 'at most 18 allowed' beside a row detected with 19 wrong, at an
    alpha equal to that row's p). A binary search: log2(limit) p-values."""
    lo, hi = -1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if p_of(mid) <= alpha:
            lo = mid
        else:
            hi = mid - 1
    return lo


def bonferroni(p: float, tries: int) -> float:
    """Correct a p-value for `tries` looks (the best of several candidates), the product
    rounded up, as every p-value here."""
    return _shared(p, Fraction(1, max(1, tries)))  # (exact: tries may pass the floats' range, 176! does)


#: the output scheme reads a suspect's answers two ways, and alpha is shared out between them
#: (a weighted Bonferroni): the answers as they are take 99% of it, the answers through the
#: relabelling of their values that matches the most keys 1%, shared in turn among all the
#: relabellings that search tries. A thief who renumbers the classes (a permuted head, labels
#: 1..10) is found where the keys are many enough for it; the first reading pays 1% for that.
RELABEL_SHARE = Fraction(1, 100)


def _shared(p: float, share: Fraction) -> float:
    """p over its share of alpha, rounded up (at most 1; NaN, no reading, as 1)."""
    if not isfinite(p) or p >= 1.0:
        return min(1.0, p)
    value = Fraction(p) / share
    return 1.0 if value >= 1 else _at_least(value)


def as_answered(p: float) -> float:
    """The p-value of the output scheme's keys matched as the suspect answers them."""
    return _shared(p, 1 - RELABEL_SHARE)


def keys_p_value(matches: int, keys: int, labels: int, chosen: tuple[int, int] | None = None,
                 relabel: tuple[int, int] | None = None) -> float:
    """The output scheme's p-value of `matches` of `keys` (matches_p_value) with its reading's
    share of alpha: as answered (`relabel` None), or through the best relabelling of D distinct
    answers as C classes (`relabel` = (C, D))."""
    p = matches_p_value(matches, keys, labels, chosen)
    return as_answered(p) if relabel is None else relabelled(p, *relabel)


def relabelled(p: float, classes: int, values: int) -> float:
    """The p-value of the keys matched through the best relabelling of a suspect's `values`
    distinct answers as `classes` classes: one of classes! / (classes - values)! (every way of
    giving each value a class of its own; the values depend on the suspect and the key inputs
    alone, not on the keys' labels)."""
    return _shared(p, RELABEL_SHARE / perm(classes, min(values, classes)))


def check_alpha(alpha: float) -> float:
    """alpha is a probability in (0, 1); NaN, infinities, 0 and 1 are refused (at 1 every model,
    whatever it reads, would be detected)."""
    if not isinstance(alpha, (int, float)) or not isfinite(alpha) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return float(alpha)
