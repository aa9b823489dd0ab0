"""AWQ scale search: the scales' form, the grid, ties, the gain on outlier channels, the folds."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.awq import (
    activation_mean,
    alpha_grid,
    awq_scales,
    fold_into_norm,
    fold_into_rows,
    linears_output_error,
    scale_columns,
    scaled_fake_quant,
    search_scales,
)
from harness.quant.formats import QuantFormat


def int3(group_size: int = 32):
    return QuantFormat(fmt="int", bits=3, group_size=group_size).format()


def outlier_inputs(n: int = 256, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a few salient channels, the case AWQ is built for."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=gen) @ torch.randn(8, cols, generator=gen)
    x = base + 0.3 * torch.randn(n, cols, generator=gen)
    x[:, :4] *= 20.0
    return x


def test_scales_form_and_grid():
    x_mean = torch.tensor([0.5, 2.0, 8.0, 1.0])
    assert torch.equal(awq_scales(x_mean, 0.0), torch.ones(4))
    s = awq_scales(x_mean, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))  # straddles 1
    assert torch.allclose(s / s[0], (x_mean / x_mean[0]).sqrt())
    assert awq_scales(torch.tensor([0.0, 1.0]), 0.5).min() > 0  # a dead channel: no zero scale
    assert alpha_grid(20) == [i / 20 for i in range(20)] and alpha_grid(1) == [0.0]
    assert activation_mean(torch.tensor([[[-1.0, 2.0]], [[3.0, 0.0]]])).tolist() == [2.0, 1.0]
    with pytest.raises(HarnessError, match="awq_grid=0"):
        alpha_grid(0)


def test_alpha_zero_is_plain_quantization_and_ties_keep_it():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    fmt = int3()
    assert torch.equal(scaled_fake_quant(w, torch.ones(64), fmt),
                       fmt.fake_quantize(w, scale_dtype=torch.float16))
    res = search_scales(activation_mean(outlier_inputs()), [w], fmt, lambda _c: 1.0, n_grid=20)
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(64))
    assert len(res.errors) == 20
    one = search_scales(activation_mean(outlier_inputs()), [w], fmt,
                        lambda c: float(c[0].sum()), n_grid=1)
    assert one.alpha == 0.0 and one.errors == (one.err_plain,)


def test_outlier_channels_scaled_beat_plain_rtn():
    x = outlier_inputs()
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(48, 64, generator=gen) * 0.05 for _ in range(2)]
    fmt = int3()
    res = search_scales(activation_mean(x), weights, fmt,
                        lambda c: linears_output_error(x, weights, c), n_grid=20)
    plain = linears_output_error(x, weights, [fmt.fake_quantize(w, scale_dtype=torch.float16)
                                              for w in weights])
    assert res.err_plain == pytest.approx(plain, rel=1e-6)
    assert res.alpha > 0 and res.err_best < 0.8 * plain
    assert res.err_best == min(res.errors)
    # what the fold stores: RTN of W*s, seen through inputs divided by s
    scaled = [fmt.fake_quantize(scale_columns(w, res.scales), scale_dtype=torch.float16)
              for w in weights]
    xs = x / res.scales
    err = sum(float((xs @ q.T - x @ w.T).pow(2).mean()) for q, w in zip(scaled, weights, strict=True))
    assert err == pytest.approx(res.err_best, rel=1e-4)


def test_folds_keep_the_function():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 32, generator=gen)
    s = torch.rand(32, generator=gen) + 0.5
    gamma, beta = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    w = torch.randn(8, 32, generator=gen)
    g2, b2 = fold_into_norm(gamma, beta, s)
    assert torch.allclose((x * g2 + b2) @ scale_columns(w, s).T, (x * gamma + beta) @ w.T,
                          atol=1e-5)
    prev, pbias = torch.randn(32, 16, generator=gen), torch.randn(32, generator=gen)
    p2, pb2 = fold_into_rows(prev, pbias, s)
    h = torch.randn(5, 16, generator=gen)
    assert torch.allclose((h @ p2.T + pb2) @ scale_columns(w, s).T,
                          (h @ prev.T + pbias) @ w.T, atol=1e-5)
    assert fold_into_norm(gamma, None, s)[1] is None


def test_bad_shapes_are_one_line_errors():
    fmt = int3()
    with pytest.raises(HarnessError, match="input channels"):
        search_scales(torch.ones(32), [torch.ones(4, 64)], fmt, lambda c: 0.0)
    with pytest.raises(HarnessError, match="at least one weight"):
        search_scales(torch.ones(32), [], fmt, lambda c: 0.0)
    with pytest.raises(HarnessError, match="norm weight"):
        fold_into_norm(torch.ones(16), None, torch.ones(32))
    with pytest.raises(HarnessError, match="rows"):
        fold_into_rows(torch.ones(16, 32), None, torch.ones(32))
