"""Integer and NF3 fake-quantization as autograd Functions with analytic backwards (CPU path;
CUDA uses the Triton kernel of ``harness.quant.triton_fq``).

The reference graph (``fake_quantize(..., fused=False)``) records ~20 autograd nodes per weight;
these Functions save a few per-element tensors and compute the same gradient in closed form. For asymmetric INT with zero point z (detached), scale s = (max - min) / qmax and
codes c = clamp(round(x/s) + z, 0, qmax), out = (c - z) * s:

    d out / d x   = 1 where x/s + z was not clamped (straight-through), else 0
    d out / d s   = (c - z) - (x / s) * inside
    d s / d max   = 1 / qmax,  d s / d min = -1 / qmax   (0 where max - min < 1e-5)

and the group's max/min gradients go to the elements that attain them, split evenly among ties
as torch's amax/amin backward does. Symmetric: s = max|x| / qmax, out = clamp(round(x/s)) * s.
"""

from __future__ import annotations

import torch

from harness.quant.grid import (
    NF3_LEVELS,
    div_exact,
    nf3_side_codes,
    nf3_values,
    round_half_away,
    round_scale,
)


def _tie_share(xg: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` (one value per group) split evenly over the elements equal to ``target``."""
    hit = (xg == target).to(xg.dtype)
    return hit * (grad / hit.sum(-1, keepdim=True))


# Masks are kept as 0/1 floats: on the CPU a bool operand in arithmetic, torch.where and
# masked_fill each cost 5-25x a float elementwise pass (measured on 2752x1024), so each mask is
# converted once and then only multiplied.


class IntFakeQuant(torch.autograd.Function):
    """Saves the straight-through mask and the scale-gradient term per element instead of
    recomputing the rounding in the backward; the backward is then two passes plus the ties.
    """

    @staticmethod
    def forward(ctx, xg: torch.Tensor, bits: int, symmetric: bool, detach_scales: bool,
                scale_dtype):
        # xg: float32 [out, n_groups, group]
        if symmetric:
            qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
            absmax = xg.abs().amax(-1, keepdim=True)
            raw = div_exact(absmax.clamp(min=1e-5), qmax)
        else:
            qmax, qmin = 2**bits - 1, 0
            mx, mn = xg.amax(-1, keepdim=True), xg.amin(-1, keepdim=True)
            raw = div_exact((mx - mn).clamp(min=1e-5), qmax)
        scale = raw if scale_dtype is None else raw.to(scale_dtype).float()
        v = xg / scale
        r = round_half_away(v)
        if not symmetric:
            zero = torch.clamp(-round_half_away(mn / scale), 0, qmax)
            r = r + zero
        codes = r.clamp(qmin, qmax)
        shifted = codes if symmetric else codes - zero
        out = shifted * scale
        inside = ((r >= qmin) & (r <= qmax)).to(xg.dtype)
        ctx.meta = (symmetric, detach_scales, qmax)
        if detach_scales:
            ctx.save_for_backward(inside)
        elif symmetric:
            # d out/d scale = (c - z) - v * inside, routed to max|x| through d|x|/dx = sign(x)
            ctx.save_for_backward(inside, shifted - v * inside, xg, absmax, absmax >= 1e-5)
        else:
            ctx.save_for_backward(inside, shifted - v * inside, xg, mx, mn, (mx - mn) >= 1e-5)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        symmetric, detach_scales, qmax = ctx.meta
        inside = ctx.saved_tensors[0]
        grad = g * inside
        if detach_scales:
            return grad, None, None, None, None
        if symmetric:
            _, term, xg, absmax, live = ctx.saved_tensors
            gs = (g * term).sum(-1, keepdim=True) * live / qmax
            grad = grad + _tie_share(xg.abs(), absmax, gs) * torch.sign(xg)
        else:
            _, term, xg, mx, mn, live = ctx.saved_tensors
            gs = (g * term).sum(-1, keepdim=True) * live / qmax
            grad = grad + _tie_share(xg, mx, gs) - _tie_share(xg, mn, gs)
        return grad, None, None, None, None


class NF3FakeQuant(torch.autograd.Function):
    """NF3 (BitDistiller's asymmetric n2f3) with the reference graph's gradient in closed form.

    out = where(x >= 0, q * mx, q * mn) with mx = max(amax, 1e-5), mn = max(|amin|, 1e-5) and
    q the level of x / mx (or x / mn); straight-through: d out/dx = 1, and unless scales are
    detached d out/d mx = q - x/mx (x >= 0), d out/d mn = q - x/mn (x < 0), routed to the
    elements attaining amax / amin (ties split). Saves the codes (uint8) instead of ~10 float
    intermediates of the op-by-op graph.
    """

    @staticmethod
    def forward(ctx, xg: torch.Tensor, detach_scales: bool, scale_dtype):
        amax, amin = xg.amax(-1, keepdim=True), xg.amin(-1, keepdim=True)
        mx = round_scale(amax.clamp(min=1e-5), scale_dtype)
        mn = round_scale(amin.abs().clamp(min=1e-5), scale_dtype)
        codes, s = nf3_side_codes(xg, mx, mn)
        ctx.save_for_backward(xg, codes, mx, mn, amax, amin)
        ctx.detach_scales = detach_scales
        return nf3_values(codes, s)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.detach_scales:
            return g, None, None
        xg, codes, mx, mn, amax, amin = ctx.saved_tensors
        pos = (xg >= 0).to(xg.dtype)
        s = mx * pos + mn * (1 - pos)
        levels = torch.tensor(NF3_LEVELS, dtype=xg.dtype, device=xg.device)
        d = g * (levels.take(codes.long()) - xg / s)
        gmx = (d * pos).sum(-1, keepdim=True) * (amax >= 1e-5)
        gmn = (d * (1 - pos)).sum(-1, keepdim=True) * (amin.abs() >= 1e-5) * amin.sign()
        grad = g + _tie_share(xg, amax, gmx) + _tie_share(xg, amin, gmn)
        return grad, None, None
