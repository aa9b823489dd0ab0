"""The intfz format (harness.quant.intfz): integer codes, fp16 scale and fp16 fractional zero
per group, HQQ's storage; its math, packing, size and the two linear forms."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.formats import FORMATS, QuantFormat, get_format
from harness.quant.linear import PackedLinear, QuantLinear


def _w(shape=(64, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(*shape, generator=g)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128, -1])
def test_roundtrip_is_bit_exact_and_sized(bits, gs):
    w = _w()
    fmt = get_format("intfz", bits, gs)
    q = fmt.quantize(w)
    fq = fmt.fake_quantize(w, scale_dtype=torch.float16)
    assert torch.equal(fmt.dequantize(q), fq)
    packed = fmt.pack(w)
    assert torch.equal(packed.dequantize(), fq)
    assert torch.equal(packed.qparams().codes, q.codes)
    assert q.zeros.dtype == torch.float16 and q.scales.dtype == torch.float16
    assert int(q.codes.max()) <= 2**bits - 1
    g = w.shape[1] if gs == -1 else gs
    assert packed.nbytes * 8 / w.numel() == pytest.approx(bits + 32 / g)


def test_the_grid_spans_min_to_max_with_a_fractional_zero():
    w = _w()
    fmt = get_format("intfz", 3, 64)
    q = fmt.quantize(w)
    xg, codes = w.reshape(64, -1, 64), q.codes.reshape(64, -1, 64)
    assert torch.equal(codes.gather(-1, xg.argmin(-1, keepdim=True)).float().max(),
                       torch.tensor(0.0))
    assert torch.equal(codes.gather(-1, xg.argmax(-1, keepdim=True)).float().min(),
                       torch.tensor(7.0))
    z = q.zeros.float()
    assert (z - z.round()).abs().max() > 0.1  # not on the integer grid
    mn = xg.amin(-1)
    torch.testing.assert_close(z, (-mn / q.scales.float()).half().float())
    # min/max with an unrounded zero loses no level to the zero's rounding
    err = (w - fmt.fake_quantize(w, scale_dtype=torch.float16)).pow(2).mean()
    err_int = (w - get_format("int", 3, 64).fake_quantize(w, scale_dtype=torch.float16)).pow(2)
    assert err < err_int.mean()


def test_straight_through_gradient():
    w = _w().requires_grad_(True)
    fmt = get_format("intfz", 3, 64)
    out = fmt.fake_quantize(w, scale_dtype=torch.float16)
    assert torch.equal(out.detach(), fmt.fake_quantize(w.detach(), scale_dtype=torch.float16))
    out.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    w2 = w.detach().clone().requires_grad_(True)
    fmt.fake_quantize(w2, detach_scales=True, scale_dtype=torch.float16).sum().backward()
    # scales and zeros detached: the identity inside the grid (min/max map onto its ends)
    assert (w2.grad == 1).float().mean() > 0.99 and set(w2.grad.unique().tolist()) <= {0.0, 1.0}


def test_quant_and_packed_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 48)
    spec = QuantFormat(fmt="intfz", bits=3, group_size=64)
    m = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, 256)
    y = m(x)
    p = m.to_packed()
    assert torch.equal(p(x), y)
    empty = PackedLinear.from_packed_spec(p.packed_spec())
    assert empty.q_zeros.dtype == torch.float16 and empty.q_zeros.shape == (48, 4)
    empty.load_state_dict(p.state_dict())
    assert torch.equal(empty.dequantized_weight(), p.dequantized_weight())
    assert p.packed_nbytes() == 48 * 256 * 3 // 8 + 48 * 4 * 2 * 2 + 48 * 2
    assert "intfz3 g64" in repr(p)


@pytest.mark.parametrize("kw,needle", [
    (dict(bits=3, symmetric=True), "intfz is asymmetric"),
    (dict(bits=9), "outside 1-8"),
    (dict(bits=3, scaling="absmax"), "does not apply to fmt=intfz"),
])
def test_bad_specs_are_one_line(kw, needle):
    with pytest.raises(ValueError, match=needle):
        QuantFormat(fmt="intfz", **kw)
    with pytest.raises(HarnessError, match=needle):
        get_format("intfz", kw["bits"], 64, kw.get("symmetric", False),
                   **({"scaling": kw["scaling"]} if "scaling" in kw else {}))


def test_registered_lazily():
    assert "intfz" in FORMATS
    code = ("import sys, harness.quant.formats as f; assert 'harness.quant.intfz' not in "
            "sys.modules; f.get_format('intfz', 3); assert 'harness.quant.intfz' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
