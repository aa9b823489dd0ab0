"""HQQ (harness.quant.hqq): the solver as transcribed from the reference, its storage in
intfz (fractional zeros) and int (rounded zeros), and RTN for comparison. The package itself
is compared in test_hqq_reference.py."""

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


def _reference_legacy(tensor, scale, zero, qmax, lp_norm=0.7, beta=10.0, iters=20):
    """optimize_weights_proximal_legacy as hqq 0.2.8 writes it (scale is HQQ's 1/s; beta is
    never multiplied by kappa there)."""
    def shrink(x, beta):
        return torch.sign(x) * torch.relu(torch.abs(x) - (1.0 / beta) * torch.pow(torch.abs(x),
                                                                                   lp_norm - 1))
    best_error = torch.tensor(torch.inf)
    for _ in range(iters):
        w_q = torch.round(tensor * scale + zero).clamp(0, qmax)
        w_r = (w_q - zero) / scale
        w_e = shrink(tensor - w_r, beta)
        zero = torch.mean(w_q - (tensor - w_e) * scale, axis=-1, keepdim=True)
        current_error = torch.abs(tensor - w_r).mean().float()
        if current_error < best_error:
            best_error = current_error
        else:
            break
    return zero


@pytest.mark.parametrize("bits,gs", [(3, 64), (2, 32), (4, 128)])
def test_zero_matches_the_transcribed_reference(bits, gs):
    w = _heavy_tailed()
    res = hqq_quantize(w, get_format("intfz", bits, gs), round_zero=False)
    xg = w.reshape(-1, gs)
    inv = (2**bits - 1) / (xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True))
    ref = _reference_legacy(xg, inv, -xg.amin(-1, keepdim=True) * inv, 2**bits - 1)
    torch.testing.assert_close(res.zero_frac, ref.reshape(w.shape[0], -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.scale, 1 / inv.reshape(w.shape[0], -1), atol=0, rtol=0)


def test_round_zero_default_is_the_reference_s():
    w = _heavy_tailed()
    for bits in (2, 3, 4):
        fmt = get_format("intfz", bits, 64)
        rounded = bits == 4  # BaseQuantizeConfig: round_zero only at 4 bits
        assert torch.equal(hqq_quantize(w, fmt).zero_frac,
                           hqq_quantize(w, fmt, round_zero=rounded).zero_frac)
    # the start is rounded, the optimised zero is fractional either way
    z = hqq_quantize(w, get_format("intfz", 4, 64)).zero_frac
    assert (z - z.round()).abs().max() > 0.01


@pytest.mark.parametrize("bits,gs", [(3, 64), (4, 128)])
def test_fractional_zero_beats_rtn_on_heavy_tails(bits, gs):
    w = _heavy_tailed()
    res = hqq_quantize(w, get_format("intfz", bits, gs))
    rtn = get_format("int", bits, gs).fake_quantize(w, scale_dtype=torch.float16)
    for p in (1, 2):
        assert (w - res.weight).abs().pow(p).mean() < 0.97 * (w - rtn).abs().pow(p).mean()
    # the integer zero the int format can store gives the gain back (see the module docstring)
    res_int = hqq_quantize(w, get_format("int", bits, gs))
    assert (w - res_int.weight).abs().mean() < 1.01 * (w - rtn).abs().mean()
    assert (w - res_int.weight).abs().mean() > 0.99 * (w - rtn).abs().mean()
    assert torch.equal(res_int.weight_frac, res.weight)


def test_intfz_stores_the_fractional_zero():
    w = _heavy_tailed()
    fmt = get_format("intfz", 3, 64)
    res = hqq_quantize(w, fmt)
    assert res.qparams.zeros.dtype == torch.float16 and res.qparams.scales.dtype == torch.float16
    assert torch.equal(res.qparams.zeros, res.zero_frac.half())
    assert torch.equal(res.weight, res.weight_frac)
    packed = pack_qparams(res.qparams, fmt)
    assert torch.equal(packed.dequantize(), res.weight)
    assert packed.nbytes * 8 / w.numel() == 3 + 32 / 64  # codes at 3 bits, fp16 scale + zero


def test_int_stores_the_rounded_zero():
    w = _heavy_tailed()
    fmt = get_format("int", 3, 64)
    res = hqq_quantize(w, fmt)
    assert torch.equal(pack_qparams(res.qparams, fmt).dequantize(), res.weight)
    assert res.qparams.zeros.dtype == torch.uint8 and int(res.qparams.zeros.max()) <= 7


def test_keep_best_never_worse():
    w = _heavy_tailed()
    fmt = get_format("intfz", 3, 64)
    last, best = hqq_quantize(w, fmt), hqq_quantize(w, fmt, keep_best=True)
    assert (w - best.weight_frac).abs().mean() <= (w - last.weight_frac).abs().mean() * 1.001


@pytest.mark.parametrize("fmt", [("nf3", 3, 64, False), ("int", 3, 64, True),
                                 ("ternary", 2, 64, False)])
def test_only_asymmetric_integer_formats(fmt):
    with pytest.raises(HarnessError, match="hqq.*fmt=intfz"):
        hqq_quantize(_heavy_tailed(), get_format(*fmt))
