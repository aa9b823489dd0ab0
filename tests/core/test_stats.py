"""Bootstrap intervals, paired tests and replicate summaries (harness/stats.py)."""

from __future__ import annotations

import math
import random

import pytest

from harness.stats import (
    intervals_overlap,
    mcnemar,
    mean_std,
    paired_ppl,
    ppl_interval,
)


def _windows(mean: float, spread: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.gauss(0, spread) for _ in range(n)]


def test_interval_contains_the_ppl_and_narrows_with_more_windows():
    few = _windows(3.5, 0.2, 8, seed=1)
    many = _windows(3.5, 0.2, 200, seed=1)
    for w in (few, many):
        low, high = ppl_interval(w)
        assert low < math.exp(sum(w) / len(w)) < high
    width = lambda w: ppl_interval(w)[1] - ppl_interval(w)[0]  # noqa: E731
    assert width(many) < width(few) / 2  # ~1/sqrt(n): 25x the windows, ~1/5 the width


def test_interval_is_a_function_of_the_windows_alone():
    w = _windows(3.0, 0.3, 20, seed=2)
    assert ppl_interval(w) == ppl_interval(list(w))
    assert ppl_interval(w, seed=1) != ppl_interval(w, seed=2)


def test_interval_coverage_is_near_95_percent():
    # windows drawn around a known mean: the interval should contain exp(true mean) about
    # 95% of the time (a 2x-too-narrow interval covers ~68%, a 2x-too-wide one ~100%)
    hits = 0
    trials = 200
    for t in range(trials):
        w = _windows(3.0, 0.25, 40, seed=100 + t)
        low, high = ppl_interval(w, iters=400)
        hits += low <= math.exp(3.0) <= high
    assert 0.88 <= hits / trials <= 0.99


def test_no_interval_from_a_single_window():
    assert ppl_interval([3.2]) is None


def test_paired_comparison_sees_a_small_consistent_gap_that_unpaired_intervals_hide():
    base = _windows(3.5, 0.4, 30, seed=3)  # windows vary a lot between themselves...
    worse = [x + 0.02 for x in base]  # ...but B is 2% worse on every one of them
    assert intervals_overlap(ppl_interval(base), ppl_interval(worse))
    res = paired_ppl(worse, base)
    assert res.ratio == pytest.approx(math.exp(0.02))
    assert res.significant and res.low > 1 and res.p_value < 0.01


def test_paired_comparison_of_noise_is_not_significant():
    rng = random.Random(4)
    a = _windows(3.5, 0.4, 30, seed=5)
    b = [x + rng.gauss(0, 0.05) for x in a]
    res = paired_ppl(a, b)
    assert res.low < 1 < res.high and not res.significant and res.p_value > 0.05


def test_paired_comparison_refuses_different_windows():
    with pytest.raises(ValueError, match="not the same evaluation"):
        paired_ppl([1.0, 2.0], [1.0, 2.0, 3.0])


def test_mcnemar_counts_only_disagreements():
    a = [1] * 30 + [0] * 10 + [1] * 2
    b = [1] * 30 + [0] * 10 + [0] * 2
    res = mcnemar(a, b)
    assert (res.only_a, res.only_b, res.n) == (2, 0, 42)
    assert res.p_value == pytest.approx(0.5)  # 2 of 2 discordant: 2 * 0.25
    assert not res.significant
    strong = mcnemar([1] * 20 + [0] * 5, [0] * 20 + [0] * 5)
    assert strong.p_value == pytest.approx(2 / 2 ** 20) and strong.significant


def test_mcnemar_identical_runs_have_p_one():
    assert mcnemar([1, 0, 1], [1, 0, 1]).p_value == 1.0


def test_mean_std_of_replicates():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    mean, std, n = mean_std([5.0])
    assert (mean, std, n) == (5.0, None, 1)
    assert mean_std([None, 4.0, 6.0])[2] == 2


def test_intervals_overlap_treats_unknown_as_not_overlapping():
    assert intervals_overlap((1, 2), (1.5, 3))
    assert not intervals_overlap((1, 2), (2.5, 3))
    assert not intervals_overlap(None, (1, 2))
