"""HQQ (harness.quant.hqq) against the reference's legacy solver and RTN."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.formats import get_format
from harness.quant.hqq import hqq_quantize, pack_qparams


def _heavy_tailed(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(128, 256, generator=g)
    chi = torch.randn(128, 256, 3, generator=g).pow(2).mean(-1)  # Student-t(3) = z / sqrt(chi2/3)
    return 0.02 * w / chi.sqrt()


def _reference_legacy(tensor, scale, zero, qmax, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20):
    """optimize_weights_proximal_legacy as the reference writes it (scale is HQQ's 1/s)."""
    def shrink(x, beta):
        return torch.sign(x) * torch.relu(torch.abs(x) - (1.0 / beta) * torch.pow(torch.abs(x),
                                                                                   lp_norm - 1))
    best_error = 1e4
    for _ in range(iters):
        w_q = torch.round(tensor * scale + zero).clamp(0, qmax)
        w_r = (w_q - zero) / scale
        w_e = shrink(tensor - w_r, beta)
        zero = torch.mean(w_q - (tensor - w_e) * scale, axis=-1, keepdim=True)
        beta *= kappa
        current_error = float(torch.abs(tensor - w_r).mean())
        if current_error < best_error:
            best_error = current_error
        else:
            break
    return zero


@pytest.mark.parametrize("bits,gs", [(3, 64), (2, 32), (4, 128)])
def test_zero_matches_the_reference_solver(bits, gs):
    w = _heavy_tailed()
    fmt = get_format("int", bits, gs)
    res = hqq_quantize(w, fmt)
    xg = w.reshape(w.shape[0], -1, gs)
    s = res.qparams.scales.float().unsqueeze(-1)
    ref = _reference_legacy(xg, 1 / s, -xg.amin(-1, keepdim=True) / s, 2**bits - 1)
    # W * (1/s) vs W / s: a last-bit difference, well inside the zero's own noise
    torch.testing.assert_close(res.zero_frac, ref.squeeze(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,gs", [(3, 64), (4, 128)])
def test_fractional_zero_beats_rtn_on_heavy_tails(bits, gs):
    w = _heavy_tailed()
    fmt = get_format("int", bits, gs)
    res = hqq_quantize(w, fmt)
    rtn = fmt.fake_quantize(w, scale_dtype=torch.float16)
    for p in (1, 2):
        assert (w - res.weight_frac).abs().pow(p).mean() < 0.97 * (w - rtn).abs().pow(p).mean()
    # the integer zero the int format can store gives the gain back (see the module docstring)
    assert (w - res.weight).abs().mean() < 1.01 * (w - rtn).abs().mean()


def test_stored_form_is_the_rounded_zero_weight():
    w = _heavy_tailed()
    fmt = get_format("int", 3, 64)
    res = hqq_quantize(w, fmt)
    assert torch.equal(pack_qparams(res.qparams, fmt).dequantize(), res.weight)
    assert res.qparams.zeros.dtype == torch.uint8 and int(res.qparams.zeros.max()) <= 7


def test_keep_best_never_worse():
    w = _heavy_tailed()
    fmt = get_format("int", 3, 64)
    last, best = hqq_quantize(w, fmt), hqq_quantize(w, fmt, keep_best=True)
    assert (w - best.weight_frac).abs().mean() <= (w - last.weight_frac).abs().mean() * 1.001


@pytest.mark.parametrize("fmt", [("nf3", 3, 64, False), ("int", 3, 64, True)])
def test_only_int_asym(fmt):
    with pytest.raises(HarnessError, match="hqq"):
        hqq_quantize(_heavy_tailed(), get_format(*fmt))
