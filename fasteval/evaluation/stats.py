"""Statistics over per-sample outcomes: Wilson score intervals for accuracies and McNemar's exact test
for two classifiers scored on the same samples. One place, so `eval`, the per-class view and the
checkpoint sweep report the same intervals and tests."""

from __future__ import annotations

import math
from statistics import NormalDist

CONFIDENCE = 0.95


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval (no continuity correction) for a proportion, as fractions in [0, 1].

    It stays inside [0, 1] and behaves at 0 and ``trials`` successes, where the normal
    approximation does not. With no trials every proportion is possible: (0, 1)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside [0, trials={trials}]")
    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, n, z2 = successes / trials, trials, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # The bounds are exactly 0 and 1 at the ends (rounding would leave them a hair inside).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def _log_binom_half_cdf(k: int, n: int) -> float:
    """log P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n can be in the millions)."""
    log_half_n = -n * math.log(2.0)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(k + 1)]
    top = max(terms)
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of McNemar's exact test from the discordant counts: samples only A got right,
    samples only B got right. Under the null both are equally likely, so the smaller count is
    Binomial(only_a + only_b, 1/2); the p-value is twice its tail, at most 1 (1 with no discordance)."""
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be non-negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * math.exp(_log_binom_half_cdf(min(only_a, only_b), n)))


def percent_interval(successes: int, trials: int) -> list[float]:
    """The Wilson interval in percent, as reports and JSON show it."""
    low, high = wilson_interval(successes, trials)
    return [100.0 * low, 100.0 * high]
