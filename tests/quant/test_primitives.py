import itertools

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.formats import dequantize, fake_quantize, quantize
from harness.quant.grid import NF3_LEVELS, NF3_THRESHOLDS, round_half_away
from harness.quant.primitives import ste_round


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


# BitDistiller's n2f3 grid, copied from DD-DuDa/BitDistiller, quantization/quantizer.py
# (SteN2F3Quantizer.round_n2f3): the levels it assigns and the bounds of its torch.where chain.
# A value at a bound takes the level above it (`>=` on both sides of zero).
REF_NF3_LEVELS = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718,
                  0.3819939494132996, 0.6229856610298157, 1.0)
REF_NF3_THRESHOLDS = (-0.7675113677978516, -0.39097706973552704, -0.1234657019376755,
                      0.0916687622666359, 0.2826657369732857, 0.5024898052215576,
                      0.8114928305149078)


def test_nf3_tables_are_bitdistillers():
    assert NF3_LEVELS == REF_NF3_LEVELS
    assert NF3_THRESHOLDS == REF_NF3_THRESHOLDS


def _f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def _f32_step(v: float, toward: float) -> float:
    """The float32 next to ``v`` (as float32) in the direction of ``toward``."""
    t = torch.tensor(v, dtype=torch.float32)
    return torch.nextafter(t, torch.tensor(toward, dtype=torch.float32)).item()


def _nf3_threshold_row():
    """One row, max 2 and min -4 (powers of two: dividing by them is exact), with the values
    a float32 ulp below, at, and a float32 ulp above every reference bound, plus the ends and 0;
    with the level each must get by the reference's rule."""
    values, levels = [2.0, -4.0, 0.0], [1.0, -1.0, 0.0]
    for i, t in enumerate(REF_NF3_THRESHOLDS):
        below, above = REF_NF3_LEVELS[i], REF_NF3_LEVELS[i + 1]
        for normed, level in ((_f32_step(t, -2.0), below), (_f32(t), above),
                              (_f32_step(t, 2.0), above), (_f32(t) - 0.01, below),
                              (_f32(t) + 0.01, above)):
            values.append(normed * (2.0 if t > 0 else 4.0))
            levels.append(level)
    scale = [2.0 if v >= 0 else 4.0 for v in values]
    expected = [_f32(lv) * s for lv, s in zip(levels, scale, strict=True)]
    return torch.tensor([values]), torch.tensor([expected]), levels


@pytest.mark.parametrize("path", ["no_grad", "autograd_function", "reference_graph"])
def test_nf3_levels_either_side_of_each_reference_threshold(path):
    w, expected, _ = _nf3_threshold_row()
    if path != "no_grad":
        w.requires_grad_(True)
    out = fake_quantize(w, "nf3", bits=3, group_size=-1, fused=path == "autograd_function")
    assert torch.equal(out.detach(), expected)


def test_nf3_codes_either_side_of_each_reference_threshold():
    w, expected, levels = _nf3_threshold_row()
    q = quantize(w, "nf3", bits=3, group_size=-1)
    assert q.codes[0].tolist() == [REF_NF3_LEVELS.index(lv) for lv in levels]
    assert q.scales.tolist() == [[2.0]] and q.zeros.tolist() == [[4.0]]
    assert torch.equal(dequantize(q), expected)


def test_nf3_hand_computed():
    # max = 2, min = -4. Positives / 2, negatives / 4, then the reference's level for each:
    # normed -0.25 is in [-0.3910, -0.1235) -> -0.2469; 0.15 in [0.0917, 0.2827) -> 0.1833;
    # 0.45 in [0.2827, 0.5025) -> 0.3820; -0.1 >= -0.1235 -> 0; 0.55 in [0.5025, 0.8115) -> 0.6230.
    w = torch.tensor([[-4.0, -1.0, 0.3, 0.9, 2.0, -0.4, 1.1, 0.0]])
    expected = [-4.0, -0.2469314038753510 * 4, 0.1833375245332718 * 2, 0.3819939494132996 * 2,
                2.0, 0.0, 0.6229856610298157 * 2, 0.0]
    out = fake_quantize(w, "nf3", bits=3, group_size=-1)
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6)


# The integer grids at every width, from METHODS.md's definition: asymmetric
#   scale = (max - min) / (2^b - 1), zero = clamp(-round(min / scale), 0, 2^b - 1),
#   code = clamp(round(w / scale) + zero, 0, 2^b - 1), value = (code - zero) * scale;
# symmetric scale = max|w| / (2^(b-1) - 1), codes round(w / scale) in [-2^(b-1), 2^(b-1) - 1]
# stored offset by 2^(b-1); round is half away from zero. Inputs are multiples of a power-of-two
# step, so every expectation is exact in float32 and fp16 (the scale storage dtype).
STEP = 2.0**-4
FRACTIONS = (0.25, 0.5, 0.75)


def _between(k: int, f: float) -> int:
    """Level of (k + f) * step, 0 < f < 1: the nearer one, ties away from zero."""
    if f != 0.5:
        return k if f < 0.5 else k + 1
    return k + 1 if k >= 0 else k


def _grid_row(lo: int, hi: int):
    """Every level lo..hi (in steps) and points a quarter, half and three quarters between
    neighbours, with their expected levels."""
    t = [float(k) for k in range(lo, hi + 1)]
    levels = list(range(lo, hi + 1))
    for k in range(lo, hi):
        for f in FRACTIONS:
            t.append(k + f)
            levels.append(_between(k, f))
    return t, levels


def _run(t, path, bits, symmetric):
    """The dequantized values of ``t * STEP`` (one group) by ``path``, and the stored codes,
    scale and zero point (None for the fake-quantize paths)."""
    w = torch.tensor([[x * STEP for x in t]])
    if path == "quantize":
        q = quantize(w, "int", bits, group_size=-1, symmetric=symmetric)
        zero = None if q.zeros is None else q.zeros.item()
        return dequantize(q)[0].tolist(), q.codes[0].tolist(), q.scales.item(), zero
    if path != "no_grad":
        w.requires_grad_(True)
    out = fake_quantize(w, "int", bits, group_size=-1, symmetric=symmetric,
                        fused=path == "autograd_function")
    return out.detach()[0].tolist(), None, None, None


INT_PATHS = ["no_grad", "autograd_function", "reference_graph", "quantize"]


@pytest.mark.parametrize("path", INT_PATHS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_asymmetric_grid_every_level_and_tie_at_every_width(bits, path):
    # min = -z steps, max = (2^b - 1 - z) steps: scale is one step and the zero point is z.
    qmax, z = 2**bits - 1, 2 ** (bits - 1)
    t, levels = _grid_row(-z, qmax - z)
    values, codes, scale, zero = _run(t, path, bits, False)
    assert values == [k * STEP for k in levels]
    assert sorted(set(values)) == [k * STEP for k in range(-z, qmax - z + 1)]
    if path == "quantize":
        assert scale == STEP and zero == z
        assert codes == [k + z for k in levels]


@pytest.mark.parametrize("path", INT_PATHS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("sign", [1, -1])
def test_asymmetric_one_signed_group_saturates_at_the_clamped_end(bits, path, sign):
    # All positive: min = 3 steps, zero = clamp(-3) = 0, so codes 3..qmax+3 clamp to qmax and
    # the top three values land on qmax steps. All negative mirrors it: zero clamps to qmax.
    qmax, m = 2**bits - 1, 3
    t = [sign * (m + j) for j in range(qmax + 1)]
    values, codes, scale, zero = _run(t, path, bits, False)
    assert values == [sign * min(m + j, qmax) * STEP for j in range(qmax + 1)]
    if path == "quantize":
        assert scale == STEP
        if sign > 0:
            assert zero == 0 and codes == [min(m + j, qmax) for j in range(qmax + 1)]
        else:
            assert zero == qmax and codes == [max(qmax - m - j, 0) for j in range(qmax + 1)]


@pytest.mark.parametrize("path", INT_PATHS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_asymmetric_zero_point_rounds_half_away_and_the_top_clamps(bits, path):
    # min = -0.5 steps, max = qmax - 0.5 steps: scale is one step, zero = round(0.5) = 1 (half
    # away from zero; half-to-even would give 0). Then -0.5 -> -1 (code 0) and j + 0.5 -> j + 1
    # (code j + 2), except the top one, whose code qmax + 1 clamps to qmax: qmax - 1 steps.
    qmax = 2**bits - 1
    t = [-0.5] + [j + 0.5 for j in range(qmax)]
    values, codes, scale, zero = _run(t, path, bits, False)
    assert values == [-STEP] + [min(j + 1, qmax - 1) * STEP for j in range(qmax)]
    if path == "quantize":
        assert scale == STEP and zero == 1
        assert codes == [0] + [min(j + 2, qmax) for j in range(qmax)]


@pytest.mark.parametrize("path", INT_PATHS)
@pytest.mark.parametrize("bits", range(2, 9))  # symmetric 1-bit is refused (test_bad_arguments)
def test_symmetric_grid_every_level_and_tie_at_every_width(bits, path):
    # max|w| = 2^(b-1) - 1 steps, so the scale is one step; -2^(b-1) (code 0) stays unused.
    qmax = 2 ** (bits - 1) - 1
    t, levels = _grid_row(-qmax, qmax)
    values, codes, scale, zero = _run(t, path, bits, True)
    assert values == [k * STEP for k in levels]
    assert sorted(set(values)) == [k * STEP for k in range(-qmax, qmax + 1)]
    if path == "quantize":
        assert scale == STEP and zero is None
        assert codes == [k + 2 ** (bits - 1) for k in levels]
        assert sorted(set(codes)) == list(range(1, 2**bits))


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
