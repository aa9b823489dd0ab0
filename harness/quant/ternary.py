"""Ternary weights: {-1, 0, +1} times one fp16 scale per group (BitNet b1.58).

Scaling (a format parameter, ``scaling``):

- ``absmean`` (default, BitNet b1.58): ``s = mean|W_g|``, ``q = RoundClip(W / s, -1, 1)``.
- ``absmax``: ``s = max|W_g|``; ``|W / s| <= 1``, so rounding thresholds at 0.5.

Both round half away from zero, like every other grid here. Codes are trits ``t + 1`` in
{0, 1, 2}, five to a byte as ``sum c_i 3^i`` (3^5 = 243 <= 256): 1.6 bits per weight, plus
the fp16 scales. No fused kernel serves it; the plain torch ops run on every device.

Straight-through estimator as in BitNet: the gradient reaches every latent weight unchanged
(saturated ones too, which a clamp mask would freeze: absmean puts ~1/4 of a Gaussian group
beyond 1.5 s) and the scales take none, so ``detach_scales`` changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from harness.errors import HarnessError
from harness.quant.formats import Format, register_format
from harness.quant.grid import round_half_away, round_scale
from harness.quant.primitives import QParams, grouped

TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def ternary_scales(xg: torch.Tensor, scaling: str, scale_dtype) -> torch.Tensor:
    """Per-group scale ``[out, n_groups, 1]`` of float32 groups ``[out, n_groups, g]``."""
    mag = xg.abs()
    raw = mag.mean(-1, keepdim=True) if scaling == "absmean" else mag.amax(-1, keepdim=True)
    return round_scale(raw.clamp(min=1e-5), scale_dtype)  # clamp: an all-zero group


def ternary_trits(xg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """RoundClip(x / s, -1, 1) as float {-1, 0, 1}."""
    # + 0.0 turns round_half_away's -0.0 into +0.0, the sign bit packed codes give back
    return torch.clamp(round_half_away(xg / scale), -1, 1) + 0.0


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {0, 1, 2} -> ceil(n / 5) bytes, code i of a byte weighted 3^i. The tail is
    padded with zero codes, which unpacking drops by count."""
    flat = codes.reshape(-1).to(torch.int32)
    pad = -flat.numel() % TRITS_PER_BYTE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_POW3, dtype=torch.int32, device=flat.device)
    return (flat.view(-1, TRITS_PER_BYTE) * weights).sum(1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``numel`` codes, 1-D uint8."""
    weights = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)
    digits = (packed.to(torch.int32).unsqueeze(1) // weights) % 3
    return digits.reshape(-1)[:numel].to(torch.uint8)


class TritPacking:
    """Codes in {0, 1, 2} stored five to a byte: the storage of every three-level format (this
    one, and three-level formats of plugins)."""

    def codes_nbytes(self, numel: int) -> int:
        return -(-numel // TRITS_PER_BYTE)

    def pack_codes(self, codes):
        return pack_trits(codes)

    def unpack_codes(self, packed, numel):
        return unpack_trits(packed, numel)


@register_format("ternary")
@dataclass(frozen=True, kw_only=True)
class TernaryFormat(TritPacking, Format):
    """{-1, 0, +1} x fp16 scale per group; ``bits`` is always 2 in specs (the integer width
    of a trit), storage is 1.6 bits per weight plus scales."""

    fixed_bits: ClassVar[int | None] = 2

    bits: int = 2
    scaling: Literal["absmean", "absmax"] = "absmean"

    @classmethod
    def check(cls, bits, symmetric, params):
        if isinstance(bits, bool) or bits != cls.fixed_bits:
            raise HarnessError(f"ternary is fixed at 1.58 bits (5 weights per byte), got "
                               f"bits={bits}; drop --bits (or bits) for fmt=ternary")
        if symmetric:
            raise HarnessError("ternary is symmetric by construction; drop symmetric")
        unknown = set(params) - {"scaling"}
        if unknown:
            raise HarnessError(f"{', '.join(sorted(unknown))} does not apply to fmt=ternary; "
                               f"its parameter is scaling (absmean or absmax)")
        if params.get("scaling", "absmean") not in ("absmean", "absmax"):
            raise HarnessError(f"scaling={params['scaling']!r}: ternary takes absmean or absmax")

    @property
    def nominal_bits(self) -> float:
        return 1.58

    def label(self) -> str:
        return f"ternary({self.scaling}) g{self.group_size}"

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        return grouped(w.float(), self.group_size)

    @torch.no_grad()
    def quantize(self, w, scale_dtype=torch.float16):
        xg = self._groups(w)
        s = ternary_scales(xg, self.scaling, scale_dtype)
        codes = (ternary_trits(xg, s) + 1).to(torch.uint8)
        return QParams(codes.reshape(w.shape), s.squeeze(-1).to(scale_dtype), None, self.name,
                       self.bits, self.group_size, False, tuple(w.shape),
                       {"scaling": self.scaling})

    def dequantize(self, q, dtype=torch.float32):
        x = grouped(q.codes, q.group_size).float()
        return ((x - 1) * q.scales.float().unsqueeze(-1)).reshape(q.shape).to(dtype)

    def fake_quantize(self, w, *, detach_scales=False, scale_dtype=None, fused=True,
                      out_dtype=None):
        xg = self._groups(w)
        with torch.no_grad():
            s = ternary_scales(xg, self.scaling, scale_dtype)
            out = ternary_trits(xg, s) * s
        if torch.is_grad_enabled() and w.requires_grad:
            # `xg - xg.detach()` is exactly 0 forward, so the value stays the packed one.
            out = out + (xg - xg.detach())
        return out.reshape(w.shape).to(out_dtype or w.dtype)

    def unpack(self, p):
        q = super().unpack(p)
        q.params = {"scaling": self.scaling}
        return q
