"""Claim statistics: the exact two-sided sign test on paired runs and a seeded bootstrap interval
of the mean paired difference (scipy)."""

from __future__ import annotations

import math


BOOTSTRAP_RESAMPLES = 9999

BOOTSTRAP_SEED = 0  # fixed: the same runs give the same interval, byte for byte


def sign_test_p(n_better: int, n_worse: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) on the non-tied pairs; 1 when there are none."""
    from scipy.stats import binomtest

    n = n_better + n_worse
    return 1.0 if n == 0 else float(binomtest(n_better, n, 0.5, alternative="two-sided").pvalue)


def smallest_p(n: int) -> float:
    """The smallest two-sided sign-test p-value that n non-tied pairs can give (all one way)."""
    return min(1.0, 2.0 * 0.5 ** n) if n > 0 else 1.0


def bootstrap_ci(diffs, confidence: float, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """BCa bootstrap interval of the mean (scipy.stats.bootstrap, seeded). NaN for fewer than two
    values; a point interval when every value is the same (the resamples cannot vary)."""
    import numpy as np
    from scipy.stats import bootstrap

    x = np.asarray(diffs, dtype="float64")
    if len(x) < 2:
        return float("nan"), float("nan")
    if float(np.ptp(x)) == 0.0:
        return float(x[0]), float(x[0])
    import warnings

    lo = hi = float("nan")
    for method in ("BCa", "percentile"):  # BCa is undefined for some tiny, lopsided samples
        kw = dict(confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES, method=method, vectorized=True)
        with warnings.catch_warnings():  # a degenerate BCa warns and returns NaN: handled below
            warnings.simplefilter("ignore")
            try:
                res = bootstrap((x,), np.mean, rng=np.random.default_rng(seed), **kw)
            except TypeError:  # scipy < 1.15 names the generator random_state
                res = bootstrap((x,), np.mean, random_state=np.random.default_rng(seed), **kw)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            break
    return lo, hi


def verdict(n_better: int, n_worse: int, alpha: float) -> tuple[str, float, str]:
    """(supported | contradicted | inconclusive, sign-test p, one-line reason)."""
    p = sign_test_p(n_better, n_worse)
    n = n_better + n_worse
    if p <= alpha and n_better > n_worse:
        return "supported", p, f"supported at α = {alpha:g}"
    if p <= alpha and n_worse > n_better:
        return "contradicted", p, f"contradicted at α = {alpha:g} (the baseline is better)"
    why = f"inconclusive at this n (p > α = {alpha:g}"
    if n == 0:
        why += "; every pair is tied"
    elif smallest_p(n) > alpha:
        why += f"; {n} non-tied pair{'s' if n > 1 else ''}: smallest possible p {smallest_p(n):.3g}"
    return "inconclusive", p, why + ")"
