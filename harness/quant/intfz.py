"""``intfz``: integer codes with a fractional (fp16) zero point per group, HQQ's storage.

Per group of ``g`` weights: codes ``q`` in ``[0, 2^bits - 1]`` at ``bits`` each, an fp16 scale
``s`` and an fp16 zero ``z`` that need not be an integer::

    dequantize:  w = (q - z) * s
    quantize:    s = (max - min) / (2^bits - 1),  z = -min / s  (not rounded),
                 q = clamp(round(w / s + z), 0, 2^bits - 1)

``s`` and ``z`` are rounded to fp16 first (the stored values) and the codes computed from
them, so ``dequantize(quantize(w)) == fake_quantize(w, scale_dtype=fp16)`` bit for bit.
Rounding is half away from zero, as on every harness grid.

How it differs from ``int`` asym: ``int`` stores an integer zero at the code width (its grid
is the integers shifted by a whole number of steps, so min/max round-to-nearest moves the grid
by up to half a step and clips one end); here min maps to code 0 and max to the top code
exactly, and a method may store any zero it optimised (HQQ's half-quadratic solver,
``harness.quant.hqq``, which is why this format exists: its zero is fractional in the
reference package too, stored in fp16). Storage: ``bits`` per weight plus two fp16 numbers per
group, i.e. ``bits + 32 / g`` bits per weight (int asym: ``bits + (16 + bits) / g``). fp16
holds the zero to 2^-11 relative: 1/8 of a step at worst for 8-bit zeros near 255, far less
at the widths this is for.

Straight-through gradient: the forward value is the stored one; the backward is that of
``(clamp(round_ste(w / s + z), 0, qmax) - z) * s`` with ``s`` and ``z`` from the group's
min/max (detached with ``detach_scales``), as the ``int`` format's reference graph does. No
fused kernel serves it; the plain torch ops run on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.quant.formats import Format, register_format
from harness.quant.grid import div_exact, round_half_away, round_scale
from harness.quant.primitives import QParams, grouped, ste_round


def intfz_params(xg: torch.Tensor, bits: int, scale_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and fractional zero ``[out, n_groups, 1]`` of float32 groups, each rounded to
    ``scale_dtype`` (the stored values) with a straight-through gradient."""
    qmax = 2**bits - 1
    mx, mn = xg.amax(-1, keepdim=True), xg.amin(-1, keepdim=True)
    scale = round_scale(div_exact((mx - mn).clamp(min=1e-5), qmax), scale_dtype)
    zero = round_scale(-mn / scale, scale_dtype)
    return scale, zero


def intfz_codes(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bits: int) -> torch.Tensor:
    """``clamp(round(w / s + z), 0, 2^bits - 1)`` as float."""
    return torch.clamp(round_half_away(xg / scale + zero), 0, 2**bits - 1)


@register_format("intfz")
@dataclass(frozen=True, kw_only=True)
class IntFZFormat(Format):
    """Integer codes, fp16 scale and fp16 fractional zero per group (HQQ's storage)."""

    @classmethod
    def check(cls, bits, symmetric, params):
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise HarnessError(f"bits must be a whole number, got {bits!r}")
        if not 1 <= bits <= 8:
            raise HarnessError(f"bits={bits} is outside 1-8 for fmt=intfz; pick 1..8")
        if symmetric:
            raise HarnessError("intfz is asymmetric by construction (its zero point is what it "
                               "stores); drop symmetric or use fmt=int")
        super().check(bits, symmetric, params)

    @torch.no_grad()
    def quantize(self, w, scale_dtype=torch.float16):
        xg = grouped(w.float(), self.group_size)
        scale, zero = intfz_params(xg, self.bits, scale_dtype)
        codes = intfz_codes(xg, scale, zero, self.bits).to(torch.uint8)
        return QParams(codes.reshape(w.shape), scale.squeeze(-1).to(scale_dtype),
                       zero.squeeze(-1).to(scale_dtype), self.name, self.bits, self.group_size,
                       False, tuple(w.shape))

    def dequantize(self, q, dtype=torch.float32):
        x = grouped(q.codes, q.group_size).float()
        out = (x - q.zeros.float().unsqueeze(-1)) * q.scales.float().unsqueeze(-1)
        return out.reshape(q.shape).to(dtype)

    def fake_quantize(self, w, *, detach_scales=False, scale_dtype=None, fused=True,
                      out_dtype=None):
        xg = grouped(w.float(), self.group_size)
        with torch.no_grad():  # the stored value, computed as quantize + dequantize do
            scale, zero = intfz_params(xg, self.bits, scale_dtype)
            out = (intfz_codes(xg, scale, zero, self.bits) - zero) * scale
        if torch.is_grad_enabled() and w.requires_grad:
            scale, zero = intfz_params(xg, self.bits, scale_dtype)
            if detach_scales:
                scale, zero = scale.detach(), zero.detach()
            qmax = 2**self.bits - 1
            surrogate = (torch.clamp(ste_round(xg / scale + zero), 0, qmax) - zero) * scale
            # `s - s.detach()` is exactly 0 forward: the value stays the packed one
            out = out + (surrogate - surrogate.detach())
        return out.reshape(w.shape).to(out_dtype or w.dtype)

    def empty_zeros(self, out_f, n_groups):
        return torch.zeros(out_f, n_groups, dtype=torch.float16)
