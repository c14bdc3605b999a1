"""Exact binomial tails, p-values and decision thresholds (no approximations)."""

from __future__ import annotations

from fractions import Fraction
from math import comb

__all__ = [
    "bits_p_value",
    "matches_p_value",
    "max_bit_errors",
    "max_mismatches",
    "bonferroni",
    "smallest_bits_p_value",
]


def _binom_cdf(k: int, n: int, p: Fraction) -> Fraction:
    """P[Binomial(n, p) <= k], exactly."""
    if k < 0:
        return Fraction(0)
    if k >= n:
        return Fraction(1)
    q = 1 - p
    return sum((comb(n, i) * p**i * q ** (n - i) for i in range(k + 1)), Fraction(0))


def bits_p_value(errors: int, n_bits: int) -> float:
    """P[Binomial(N, 1/2) <= errors]: the chance that an unrelated model matches this well."""
    return float(_binom_cdf(errors, n_bits, Fraction(1, 2)))


def smallest_bits_p_value(n_bits: int) -> float:
    """The best p-value N bits can give (all bits right): 2^-N."""
    return bits_p_value(0, n_bits)


def matches_p_value(matches: int, n_keys: int, n_classes: int) -> float:
    """P[Binomial(K, 1/C) >= m]: the chance that an unrelated model hits m of K key labels."""
    return float(1 - _binom_cdf(matches - 1, n_keys, Fraction(1, n_classes)))


def max_bit_errors(n_bits: int, alpha: float) -> int:
    """The largest number of bit errors still detected at alpha (-1 when none is)."""
    e = -1
    while e + 1 <= n_bits and bits_p_value(e + 1, n_bits) <= alpha:
        e += 1
    return e


def max_mismatches(n_keys: int, n_classes: int, alpha: float) -> int:
    """The paper's Eq. 5 threshold: the most mismatches still detected at alpha (-1 when none)."""
    worst = -1
    for mism in range(n_keys + 1):
        if matches_p_value(n_keys - mism, n_keys, n_classes) <= alpha:
            worst = mism
        else:
            break
    return worst


def bonferroni(p: float, tries: int) -> float:
    """Correct a p-value for `tries` independent looks (the best of several candidates)."""
    return min(1.0, p * max(1, tries))
