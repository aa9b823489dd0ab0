import itertools

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.primitives import (
    NF3_LEVELS,
    dequantize,
    fake_quantize,
    quantize,
    round_half_away,
    ste_round,
)


def test_round_half_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.49])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3, 0, -0 * 1.0]


def test_ste_round_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -3.4], requires_grad=True)
    ste_round(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_int2_asym_hand_computed():
    # Row [-1, 0, 0.5, 2]: scale = 3/3 = 1, zero = clamp(-round(-1/1), 0, 3) = 1.
    # codes = clamp(round(w) + 1) = [0, 1, 2 (0.5 rounds away to 1), 3] -> (codes - 1) * 1.
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    out = fake_quantize(w, "int", bits=2, group_size=-1)
    assert out.tolist() == [[-1.0, 0.0, 1.0, 2.0]]


def test_int_sym_hand_computed():
    # 3-bit symmetric: scale = max|w| / 3 = 1; codes in [-4, 3].
    w = torch.tensor([[-3.0, -1.4, 0.6, 3.0]])
    assert fake_quantize(w, "int", bits=3, group_size=-1, symmetric=True).tolist() == \
        [[-3.0, -1.0, 1.0, 3.0]]


def test_nf3_hand_computed():
    # max = 2, min = -4. Positives / 2, negatives / 4, nearest level by the midpoints.
    w = torch.tensor([[-4.0, -1.0, 0.3, 0.9, 2.0, -0.4, 1.1, 0.0]])
    normed = [-1.0, -0.25, 0.15, 0.45, 1.0, -0.1, 0.55, 0.0]
    expect_levels = [-1.0, NF3_LEVELS[2], NF3_LEVELS[4], NF3_LEVELS[5], 1.0, 0.0, NF3_LEVELS[6], 0.0]
    scale = [4, 4, 2, 2, 2, 4, 2, 2]
    expected = [lv * s for lv, s in zip(expect_levels, scale, strict=True)]
    del normed
    out = fake_quantize(w, "nf3", bits=3, group_size=-1)
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6)


def test_groups_run_along_rows():
    w = torch.zeros(2, 8)
    w[0, :4] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    w[0, 4:] = torch.tensor([0.0, 10.0, 20.0, 30.0])
    out = fake_quantize(w, "int", bits=2, group_size=4)
    # Each group of 4 has its own range: both are represented exactly with 2 bits.
    assert torch.equal(out[0], w[0])


def test_fake_quantize_idempotent():
    w = torch.randn(16, 64)
    once = fake_quantize(w, "int", bits=3, group_size=32)
    assert torch.allclose(fake_quantize(once, "int", bits=3, group_size=32), once, atol=1e-6)


def test_gradients_flow_into_scales_unless_detached():
    w = torch.randn(4, 32, requires_grad=True)
    # A loss that only sees the dequantized grid: STE gives d/dw = 1 everywhere, plus the
    # min/max paths through the scale; detaching removes those extra terms.
    (fake_quantize(w, "int", bits=2, group_size=16) * torch.arange(32.0)).sum().backward()
    g_live = w.grad.clone()
    w.grad = None
    (fake_quantize(w, "int", bits=2, group_size=16, detach_scales=True)
     * torch.arange(32.0)).sum().backward()
    g_det = w.grad.clone()
    assert torch.allclose(g_det, torch.arange(32.0).expand(4, 32), atol=1e-5)
    assert not torch.allclose(g_live, g_det)


CASES = [("int", b, g, s) for b, g, s in itertools.product(range(1, 9), (-1, 16, 32), (False, True))
         if (b, s) != (1, True)]  # symmetric 1-bit is refused (test_bad_arguments)
CASES += [("nf3", 3, g, False) for g in (-1, 16, 32)]


@pytest.mark.parametrize("fmt,bits,group,sym", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_quantize_equals_fake_quantize(fmt, bits, group, sym, dtype):
    torch.manual_seed(bits * 7 + (group if group > 0 else 3))
    w = (torch.randn(24, 64) * 0.05).to(dtype)
    expected = fake_quantize(w, fmt, bits, group, sym, scale_dtype=torch.float16)
    got = dequantize(quantize(w, fmt, bits, group, sym), dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(fmt="int", bits=0), "outside 1-8"),
    (dict(fmt="int", bits=9), "outside 1-8"),
    (dict(fmt="nf3", bits=2), "3-bit"),
    (dict(fmt="int", bits=3, group_size=48), "does not divide"),
    (dict(fmt="int", bits=1, symmetric=True), "symmetric 1-bit"),
    (dict(fmt="int", bits=2.5), "whole number"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(HarnessError, match=needle):
        fake_quantize(torch.randn(4, 64), **kwargs)
