"""Integer and NF3 fake-quantization as autograd Functions with analytic backwards (CPU path;
CUDA uses the Triton kernel of ``harness.quant.triton_fq``).

The reference graph (``fake_quantize(..., fused=False)``) records ~20 autograd nodes per weight;
this Function saves only the codes and the per-group scale and computes the same gradient in
closed form. For asymmetric INT with zero point z (detached), scale s = (max - min) / qmax and
codes c = clamp(round(x/s) + z, 0, qmax), out = (c - z) * s:

    d out / d x   = 1 where x/s + z was not clamped (straight-through), else 0
    d out / d s   = (c - z) - (x / s) * inside
    d s / d max   = 1 / qmax,  d s / d min = -1 / qmax   (0 where max - min < 1e-5)

and the group's max/min gradients go to the elements that attain them, split evenly among ties
as torch's amax/amin backward does. Symmetric: s = max|x| / qmax, out = clamp(round(x/s)) * s.
"""

from __future__ import annotations

import torch

from harness.quant.primitives import (
    NF3_LEVELS,
    _nf3_codes,
    _round_scale,
    div_exact,
    round_half_away,
)


def _split_ties(xg: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    hit = (xg == target).to(xg.dtype)
    return hit / hit.sum(-1, keepdim=True)


class IntFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg: torch.Tensor, bits: int, symmetric: bool, detach_scales: bool,
                scale_dtype):
        # xg: float32 [out, n_groups, group]
        if symmetric:
            qmax = max(2 ** (bits - 1) - 1, 1)
            qmin = -(2 ** (bits - 1))
            absmax = xg.abs().amax(-1, keepdim=True)
            raw = div_exact(absmax.clamp(min=1e-5), qmax)
            scale = raw if scale_dtype is None else raw.to(scale_dtype).float()
            v = xg / scale
            r = round_half_away(v)
            codes = r.clamp(qmin, qmax)
            out = codes * scale
            live = absmax >= 1e-5
            ctx.save_for_backward(xg, v, codes, scale, absmax, live)
        else:
            qmax = 2**bits - 1
            mx, mn = xg.amax(-1, keepdim=True), xg.amin(-1, keepdim=True)
            raw = div_exact((mx - mn).clamp(min=1e-5), qmax)
            scale = raw if scale_dtype is None else raw.to(scale_dtype).float()
            zero = torch.clamp(-round_half_away(mn / scale), 0, qmax)
            v = xg / scale
            r = round_half_away(v) + zero
            codes = r.clamp(0, qmax)
            out = (codes - zero) * scale
            live = (mx - mn) >= 1e-5
            ctx.save_for_backward(xg, v, codes, scale, mx, mn, zero, live)
        ctx.meta = (bits, symmetric, detach_scales, qmax)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        bits, symmetric, detach_scales, qmax = ctx.meta
        if symmetric:
            xg, v, codes, scale, absmax, live = ctx.saved_tensors
            qmin = -(2 ** (bits - 1))
            r = round_half_away(v)
            inside = ((r >= qmin) & (r <= qmax)).to(g.dtype)
            grad = g * inside
            if not detach_scales:
                gs = (g * (codes - v * inside)).sum(-1, keepdim=True) * live / qmax
                # d|x|/dx = sign(x) (0 at 0), split over the elements attaining max|x|.
                grad = grad + gs * _split_ties(xg.abs(), absmax) * torch.sign(xg)
            return grad, None, None, None, None
        xg, v, codes, scale, mx, mn, zero, live = ctx.saved_tensors
        r = round_half_away(v) + zero
        inside = ((r >= 0) & (r <= qmax)).to(g.dtype)
        grad = g * inside
        if not detach_scales:
            gs = (g * ((codes - zero) - v * inside)).sum(-1, keepdim=True) * live / qmax
            grad = grad + gs * (_split_ties(xg, mx) - _split_ties(xg, mn))
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
        mx = _round_scale(amax.clamp(min=1e-5), scale_dtype)
        mn = _round_scale(amin.abs().clamp(min=1e-5), scale_dtype)
        pos = xg >= 0
        normed = torch.where(pos, xg / mx, xg / mn)
        codes = _nf3_codes(normed).to(torch.uint8)
        q = torch.tensor(NF3_LEVELS, dtype=xg.dtype, device=xg.device)[codes.long()]
        ctx.save_for_backward(xg, codes, mx, mn, amax, amin)
        ctx.detach_scales = detach_scales
        return torch.where(pos, q * mx, q * mn)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.detach_scales:
            return g, None, None
        xg, codes, mx, mn, amax, amin = ctx.saved_tensors
        pos = xg >= 0
        q = torch.tensor(NF3_LEVELS, dtype=xg.dtype, device=xg.device)[codes.long()]
        d = g * (q - torch.where(pos, xg / mx, xg / mn))
        gmx = torch.where(pos, d, 0).sum(-1, keepdim=True) * (amax >= 1e-5)
        gmn = torch.where(pos, 0, d).sum(-1, keepdim=True) * (amin.abs() >= 1e-5) * amin.sign()
        grad = g + gmx * _split_ties(xg, amax) + gmn * _split_ties(xg, amin)
        return grad, None, None
