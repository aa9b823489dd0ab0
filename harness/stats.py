"""Uncertainty of the harness's numbers: bootstrap intervals, paired tests, replicate summaries.

Pure functions on plain sequences (standard library only), so the store, the CLI tables and the
dashboard all compute them the same way. Perplexity windows are the resampling unit: tokens
inside a window are not independent, windows of a long held-out text nearly are (the
resampling scheme of lm-eval's bootstrap stderr, applied to the papers' windows).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

#: resamples per interval; the percentile bounds move by < 0.1% of PPL between seeds at 2,000
BOOTSTRAP_ITERS = 2000
#: fixed, so an interval is a function of the run's windows alone (a rerun gives the same)
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    values = sorted(values)
    tail = (1 - level) / 2
    last = len(values) - 1
    return values[round(tail * last)], values[round((1 - tail) * last)]


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _resampled_means(values: Sequence[float], iters: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    n = len(values)
    return [sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters)]


def ppl_interval(window_nll: Sequence[float], iters: int = BOOTSTRAP_ITERS,
                 seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of ``exp(mean NLL)`` over windows.

    Args:
        window_nll: mean NLL per predicted token of each window (equal-length windows, so the
            run's PPL is ``exp`` of their mean).

    Returns:
        ``(low, high)``; None for fewer than two windows (no spread to resample).
    """
    if len(window_nll) < 2:
        return None
    low, high = _percentiles(_resampled_means(window_nll, iters, seed), level)
    return _exp(low), _exp(high)


@dataclass(frozen=True)
class PairedPPL:
    """A/B perplexity on the same windows: ``ratio`` = PPL_A / PPL_B with its interval."""

    ratio: float
    low: float
    high: float
    p_value: float
    windows: int

    @property
    def significant(self) -> bool:
        return not (self.low <= 1.0 <= self.high)


def paired_ppl(nll_a: Sequence[float], nll_b: Sequence[float], iters: int = BOOTSTRAP_ITERS,
               seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> PairedPPL:
    """Paired bootstrap of the per-window NLL difference: both runs scored the same windows,
    so the window-to-window variation of the text cancels and a 2% gap can be significant
    where the two unpaired intervals overlap.

    The p-value is two-sided: twice the share of resampled mean differences on the far side
    of zero (at least ``1 / iters``).

    Raises:
        ValueError: different window counts (not the same evaluation), or fewer than two.
    """
    if len(nll_a) != len(nll_b):
        raise ValueError(f"the runs scored {len(nll_a)} and {len(nll_b)} windows: not the same "
                         f"evaluation")
    if len(nll_a) < 2:
        raise ValueError("a paired comparison needs at least two windows")
    diff = [a - b for a, b in zip(nll_a, nll_b, strict=True)]
    mean = sum(diff) / len(diff)
    boot = _resampled_means(diff, iters, seed)
    low, high = _percentiles(boot, level)
    far = sum(d <= 0 for d in boot) if mean > 0 else sum(d >= 0 for d in boot)
    p = min(1.0, max(2 * far / iters, 1 / iters))
    return PairedPPL(ratio=_exp(mean), low=_exp(low), high=_exp(high), p_value=p,
                     windows=len(diff))


@dataclass(frozen=True)
class PairedAccuracy:
    """McNemar's exact test on per-example correctness of two runs on the same examples."""

    acc_a: float
    acc_b: float
    only_a: int  # examples A gets right and B wrong
    only_b: int
    n: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - LEVEL


def mcnemar(correct_a: Sequence[float], correct_b: Sequence[float]) -> PairedAccuracy:
    """Exact (binomial) McNemar test: only the examples the runs disagree on carry evidence.

    Raises:
        ValueError: different example counts (not the same examples), or none.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"the runs scored {len(correct_a)} and {len(correct_b)} examples: not "
                         f"the same examples")
    if not correct_a:
        raise ValueError("no examples to compare")
    a = [x >= 0.5 for x in correct_a]
    b = [x >= 0.5 for x in correct_b]
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    k, m = min(only_a, only_b), only_a + only_b
    # two-sided exact binomial tail at p = 1/2
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    n = len(a)
    return PairedAccuracy(acc_a=sum(a) / n, acc_b=sum(b) / n, only_a=only_a, only_b=only_b,
                          n=n, p_value=p)


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """``(mean, sample std (ddof 1), n)`` of replicates; std is None for a single value."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, None, 0
    mean = sum(vals) / n
    if n < 2:
        return mean, None, n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)), n


def intervals_overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Whether two intervals share a point; an unknown interval overlaps nothing (a value
    without uncertainty is not declared within noise of anything)."""
    if a is None or b is None:
        return False
    return bool(a[0] <= b[1] and b[0] <= a[1])
