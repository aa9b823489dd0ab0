"""The INT/NF3 grid math: choose params, quantize, dequantize, fake-quantize (STE).

What the ``int`` and ``nf3`` format objects (``harness.quant.formats``) delegate to; callers
go through a format (``fake_quantize``/``quantize``/``dequantize`` in ``harness.quant.formats``
take a format object or the loose ``fmt, bits, group_size, symmetric`` fields). This module
knows no format registry, so the formats build on it and not the other way round.

Formulas are ../shared/METHODS.md's. Groups run along each row's input dimension (w is
``[out, in]``); ``group_size=-1`` is one group per row. No module state, no I/O.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from harness.errors import HarnessError
from harness.quant.fused import IntFakeQuant, NF3FakeQuant
from harness.quant.grid import (
    NF3_LEVELS,
    div_exact,
    nf3_codes,
    nf3_side_codes,
    nf3_values,
    round_half_away,
    round_scale,
    valid_group_sizes,
)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Forward: round half away from zero. Backward: identity (straight-through)."""
    return x + (round_half_away(x) - x).detach()


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if w.dim() != 2:
        raise HarnessError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    if g <= 0 or in_f % g:
        raise HarnessError(f"group size {group_size} does not divide the input dimension {in_f}; "
                           f"use one of {valid_group_sizes([in_f])}")
    return w.reshape(out_f, in_f // g, g)


SYM1_ERROR = ("symmetric 1-bit integers have no positive level (codes -1 and 0); use "
              "asymmetric int1 (each group's min and max) or the onebit method")


def check_grid(fmt: str, bits: int, symmetric: bool = False) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise HarnessError(f"bits must be a whole number, got {bits!r}")
    if fmt == "int" and symmetric and bits == 1:
        raise HarnessError(SYM1_ERROR)
    if fmt == "int" and not 1 <= bits <= 8:
        raise HarnessError(f"bits={bits} is outside 1-8 for integer formats; pick 1..8")
    if fmt == "nf3" and bits != 3:
        raise HarnessError(f"nf3 is a 3-bit format, got bits={bits}; use fmt=int for {bits} bits")
    if fmt not in ("int", "nf3"):  # other formats check themselves (harness.quant.formats)
        raise HarnessError(f"unknown format {fmt!r}; use int or nf3 (binary is OneBit's layer)")


def int_params(g: torch.Tensor, bits: int, symmetric: bool, scale_dtype):
    if symmetric:
        qmax = 2 ** (bits - 1) - 1  # bits >= 2 (check_grid refuses 1-bit symmetric)
        scale = div_exact(g.abs().amax(-1, keepdim=True).clamp(min=1e-5), qmax)
        return round_scale(scale, scale_dtype), None, -(2 ** (bits - 1)), qmax
    qmax = 2**bits - 1
    mx, mn = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    scale = round_scale(div_exact((mx - mn).clamp(min=1e-5), qmax), scale_dtype)
    zero = torch.clamp(-round_half_away(mn / scale), 0, qmax).detach()
    return scale, zero, 0, qmax


def nf3_params(g: torch.Tensor, scale_dtype):
    mx = g.amax(-1, keepdim=True).clamp(min=1e-5)
    mn = g.amin(-1, keepdim=True).abs().clamp(min=1e-5)
    return round_scale(mx, scale_dtype), round_scale(mn, scale_dtype)


def fake_quantize_grid(w: torch.Tensor, fmt: str, bits: int, group_size: int, symmetric: bool,
                        detach_scales: bool, scale_dtype, fused: bool, out_dtype) -> torch.Tensor:
    """INT/NF3 fake quantization (the ``int`` and ``nf3`` format objects' math)."""
    check_grid(fmt, bits, symmetric)
    if fused and w.is_cuda and scale_dtype in (None, torch.float16) and triton_ok():
        grouped(w, group_size)  # validates shape and group size with the usual errors
        from harness.quant.triton_fq import fake_quantize_triton  # imports triton: CUDA only

        return fake_quantize_triton(w, fmt, bits, group_size, symmetric, detach_scales,
                                    scale_dtype, out_dtype)
    x = grouped(w.float(), group_size)
    if fmt == "nf3" and fused and torch.is_grad_enabled() and w.requires_grad:
        out = NF3FakeQuant.apply(x, detach_scales, scale_dtype)
    elif fmt == "nf3" and not (torch.is_grad_enabled() and w.requires_grad):
        mx, mn = nf3_params(x, scale_dtype)  # no graph: the clip search's and packing's path
        out = nf3_values(*nf3_side_codes(x, mx, mn))
    elif fmt == "nf3":
        mx, mn = nf3_params(x, scale_dtype)
        if detach_scales:
            mx, mn = mx.detach(), mn.detach()
        normed = torch.where(x >= 0, x / mx, x / mn)
        levels = torch.tensor(NF3_LEVELS, dtype=x.dtype, device=x.device)
        q = levels[nf3_codes(normed.detach()).long()]
        exact = torch.where(x >= 0, q * mx, q * mn).detach()
        if torch.is_grad_enabled() and w.requires_grad:
            # Straight-through surrogate for the gradient; `s - s.detach()` is exactly 0 in the
            # forward pass, so the value stays bit-identical to packed dequantization.
            ste = normed + (q - normed).detach()
            surrogate = torch.where(x >= 0, ste * mx, ste * mn)
            out = exact + (surrogate - surrogate.detach())
        else:
            out = exact
    elif fused and torch.is_grad_enabled() and w.requires_grad:
        out = IntFakeQuant.apply(x, bits, symmetric, detach_scales, scale_dtype)
    else:
        scale, zero, qmin, qmax = int_params(x, bits, symmetric, scale_dtype)
        if detach_scales:
            scale = scale.detach()
        if zero is None:
            out = torch.clamp(ste_round(x / scale), qmin, qmax) * scale
        else:
            out = (torch.clamp(ste_round(x / scale) + zero, 0, qmax) - zero) * scale
    return out.reshape(w.shape).to(out_dtype or w.dtype)


_TRITON: bool | None = None


def triton_ok() -> bool:
    """Triton importable (CUDA machines); checked once. The CPU path never imports it."""
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


@dataclass
class QParams:
    """Integer codes and their parameters. Codes are unsigned (symmetric codes offset by
    2^(bits-1)); ``scales`` is ``[out, n_groups]`` (nf3: positive-side max), ``zeros`` the
    integer zero points (int asym) or the negative-side |min| (nf3)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: str
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]
    params: dict = field(default_factory=dict)  # format-specific (ternary: scaling)


@torch.no_grad()
def quantize_grid(w: torch.Tensor, fmt: str, bits: int, group_size: int, symmetric: bool,
                   scale_dtype: torch.dtype) -> QParams:
    check_grid(fmt, bits, symmetric)
    x = grouped(w.float(), group_size)
    if fmt == "nf3":
        mx, mn = nf3_params(x, scale_dtype)
        normed = torch.where(x >= 0, x / mx, x / mn)
        codes = nf3_codes(normed).to(torch.uint8)
        scales, zeros = mx.squeeze(-1).to(scale_dtype), mn.squeeze(-1).to(scale_dtype)
    else:
        scale, zero, qmin, qmax = int_params(x, bits, symmetric, scale_dtype)
        if zero is None:
            codes = (torch.clamp(round_half_away(x / scale), qmin, qmax) - qmin).to(torch.uint8)
            zeros = None
        else:
            codes = torch.clamp(round_half_away(x / scale) + zero, 0, qmax).to(torch.uint8)
            zeros = zero.squeeze(-1).to(torch.uint8)
        scales = scale.squeeze(-1).to(scale_dtype)
    return QParams(codes.reshape(w.shape), scales, zeros, fmt, bits,
                   group_size, symmetric, tuple(w.shape))


def dequantize_grid(q: QParams, dtype: torch.dtype) -> torch.Tensor:
    x = grouped(q.codes, q.group_size).float()
    s = q.scales.float().unsqueeze(-1)
    if q.fmt == "nf3":
        levels = torch.tensor(NF3_LEVELS, dtype=torch.float32, device=x.device)
        lv = levels[x.long()]
        out = torch.where(lv >= 0, lv * s, lv * q.zeros.float().unsqueeze(-1))
    elif q.zeros is None:
        out = (x + (-(2 ** (q.bits - 1)))) * s
    else:
        out = (x - q.zeros.float().unsqueeze(-1)) * s
    return out.reshape(q.shape).to(dtype)
