"""Clipping search: improvement on outliers, a brute-force check of the chosen range, the grid."""

from __future__ import annotations

import itertools

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.clip import clip_search
from harness.quant.formats import QuantFormat, fake_quantize


def fmt(bits: int = 2, group_size: int = 32, kind: str = "int") -> QuantFormat:
    return QuantFormat(fmt=kind, bits=bits, group_size=group_size, symmetric=False)


def outlier_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    idx = torch.randint(0, rows * cols, (max(1, rows * cols // 64),), generator=gen)
    w.view(-1)[idx] = 0.25 * torch.sign(torch.randn(idx.numel(), generator=gen))
    return w


def inputs(n: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qformat", [fmt(), fmt(3, kind="nf3")], ids=["int2", "nf3"])
def test_outliers_clip_lowers_output_error_and_keeps_input(qformat):
    w, x = outlier_weight(48, 64), inputs(300, 64)
    original = w.clone()
    res = clip_search(w, x, qformat, n_tokens=256)
    assert torch.equal(w, original)  # never in place
    assert res.weight.shape == w.shape and res.weight.dtype == w.dtype
    assert res.err_after < res.err_before
    assert res.max_val.shape == res.min_val.shape == (48, 2)
    wg = res.weight.view(48, 2, 32)
    assert (wg <= res.max_val.unsqueeze(-1)).all() and (wg >= res.min_val.unsqueeze(-1)).all()
    assert not torch.equal(res.weight, w)  # something was clipped


@pytest.mark.parametrize("n", [64, 16])  # Gram path (group 32 < 64 tokens) and direct path
def test_chosen_pair_matches_brute_force_one_row_one_group(n):
    w, x = outlier_weight(1, 32, seed=3), inputs(n, 32, seed=4)
    res = clip_search(w, x, fmt(group_size=32), n_tokens=n)
    errs = {}
    for i, j in itertools.product(range(10), range(10)):
        hi, lo = w.max() * (1 - i / 20), w.min() * (1 - j / 20)
        q = fake_quantize(torch.clamp(w, lo, hi), fmt="int", bits=2, group_size=32)
        errs[i, j] = float(((x.double() @ (q - w).double().T) ** 2).mean())
    best = min(errs.values())
    assert best < errs[0, 0]  # the case is one where clipping pays off
    i = round((1 - float(res.max_val[0, 0] / w.max())) * 20)
    j = round((1 - float(res.min_val[0, 0] / w.min())) * 20)
    assert errs[i, j] == pytest.approx(best, rel=1e-4)


def test_grid_is_parametrised_like_the_reference():
    w, x = outlier_weight(32, 64, seed=5), inputs(128, 64)
    org_max = w.view(32, 2, 32).amax(-1)
    default = clip_search(w, x, fmt())
    ratios = {round(float(r), 4) for r in (default.max_val / org_max).flatten()}
    assert ratios <= {round(1 - i / 20, 4) for i in range(10)} and len(ratios) > 1
    coarse = clip_search(w, x, fmt(), n_grid=10, max_shrink=0.5)
    ratios = {round(float(r), 4) for r in (coarse.max_val / org_max).flatten()}
    assert ratios <= {1.0, 0.9, 0.8, 0.7, 0.6}


def test_row_chunking_and_token_sampling_are_deterministic():
    w, x = outlier_weight(24, 64, seed=6), inputs(1000, 64)
    a = clip_search(w, x, fmt(), batch_out=10, seed=None, n_tokens=100)
    b = clip_search(w, x, fmt(), batch_out=256, seed=None, n_tokens=100)
    c = clip_search(w, x[::10][:100], fmt(), seed=None, n_tokens=100)  # the reference's stride
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)
    assert a.err_after == pytest.approx(b.err_after, rel=1e-5)
    d = clip_search(w, x, fmt(), seed=3, n_tokens=100)
    e = clip_search(w, x, fmt(), seed=3, n_tokens=100)
    assert torch.equal(d.weight, e.weight)


def test_per_row_groups_and_bad_group_size():
    w, x = outlier_weight(8, 64, seed=7), inputs(32, 64)
    res = clip_search(w, x, fmt(bits=3, group_size=-1))
    assert res.max_val.shape == (8, 1) and res.err_after <= res.err_before
    with pytest.raises(HarnessError, match="divide"):
        clip_search(w, x, fmt(group_size=48))
