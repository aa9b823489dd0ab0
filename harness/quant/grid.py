"""The rules every quantizer path shares: the NF3 grid, rounding, the exact division, the
scales' storage rounding and which group sizes fit.

The reference graph (``primitives``) and the autograd Functions (``fused``) both take these
from here, so the two paths cannot drift apart and neither imports the other for them.
Pure functions and constants; no module state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# BitDistiller's "n2f3" grid: asymmetric NF3 (positive side divided by max, negative by |min|).
NF3_LEVELS = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718,
              0.3819939494132996, 0.6229856610298157, 1.0)
NF3_THRESHOLDS = (-0.7675113677978516, -0.39097706973552704, -0.1234657019376755,
                  0.0916687622666359, 0.2826657369732857, 0.5024898052215576,
                  0.8114928305149078)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero: sign(x) * floor(|x| + 0.5) (torch.round is half-to-even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def div_exact(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t / n`` correctly rounded on every device. CUDA divides a tensor by a Python scalar as
    ``t * (1/n)``, which differs from the CPU in the last bit (and then, after fp16 rounding, in
    ~2% of SmolLM2's int3 scales); a 0-dim tensor divisor takes the exact path on both."""
    return t / t.new_full((), float(n))


def round_scale(scale: torch.Tensor, scale_dtype) -> torch.Tensor:
    """Rounds to the storage dtype with a straight-through gradient (value = stored scale)."""
    if scale_dtype is None:
        return scale
    return scale + (scale.to(scale_dtype).to(scale.dtype) - scale).detach()


def nf3_codes(normed: torch.Tensor) -> torch.Tensor:
    """uint8 code = number of thresholds <= the value: ``bucketize(right=True)``, so a value
    equal to a threshold goes up (METHODS.md: ">= it rounds to 0"). Seven compares beat
    bucketize's binary search ~4x on the CPU."""
    codes = normed >= NF3_THRESHOLDS[0]
    codes = codes.to(torch.uint8)
    for t in NF3_THRESHOLDS[1:]:
        codes += normed >= t
    return codes


def nf3_side_codes(x: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor):
    """NF3 codes of ``x`` and the scale of each element's side (``mx`` where x >= 0, else
    ``mn``). The side is picked by a 0/1 float mask, exactly ``where(x >= 0, mx, mn)`` and
    ~1.4x faster on the CPU than ``torch.where``'s bool path."""
    pos = (x >= 0).to(x.dtype)
    s = mx * pos + mn * (1 - pos)
    return nf3_codes(x / s), s


def nf3_values(codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Dequantized NF3: each code's level times its side's scale."""
    levels = torch.tensor(NF3_LEVELS, dtype=s.dtype, device=s.device)
    return levels.take(codes.long()) * s


def valid_group_sizes(in_features: Iterable[int]) -> list[int]:
    """The group sizes to suggest: every common divisor of the input dims from 8 to 1024 (all
    above 1 if none is), then -1. Any common divisor works; smaller ones cost scale bytes."""
    common = math.gcd(*in_features)
    divisors = [g for g in range(2, common + 1) if common % g == 0]
    return ([g for g in divisors if 8 <= g <= 1024] or divisors or [1]) + [-1]
