"""Fused fake-quantization + STE for CUDA in Triton: one pass forward, one pass backward.

The reference graph (``fake_quantize(..., fused=False)``) launches ~20 kernels and keeps their
outputs for autograd; here each program loads a tile of whole groups once, computes the group
parameters in registers and writes the result. The backward recomputes the parameters from the
weight instead of saving them, so training keeps no extra activation memory per quantized layer.

Gradients are those of the reference autograd graph (see ``harness.quant.fused`` for the
derivation): straight-through inside the code range, plus the gradient into the group's max/min
(split evenly among tied elements, as torch's amax/amin do) unless scales are detached. NF3:

    out = where(x >= 0, q * mx, q * mn),  d out/dx = 1,  d out/d mx = q - x/mx  (x >= 0),
    d out/d mn = q - x/mn  (x < 0),  mx = max(amax, 1e-5),  mn = max(|amin|, 1e-5).

Divisions use round-to-nearest (``div_rn``) so the forward is bit-identical to the torch path.
Imported only when a CUDA weight is fake-quantized; the core never needs Triton.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MODE_ASYM, MODE_SYM, MODE_NF3 = 0, 1, 2


@triton.jit
def _rha(v):
    # Round half away from zero, as harness.quant.primitives.round_half_away.
    return tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))


@triton.jit
def _to_scale(raw, FP16_SCALE: tl.constexpr):
    if FP16_SCALE:
        raw = raw.to(tl.float16).to(tl.float32)
    return raw


@triton.jit
def _nf3_level(c):
    return tl.where(c == 0, -1.0, tl.where(c == 1, -0.5350227355957031, tl.where(
        c == 2, -0.2469314038753510, tl.where(c == 3, 0.0, tl.where(
            c == 4, 0.1833375245332718, tl.where(c == 5, 0.3819939494132996, tl.where(
                c == 6, 0.6229856610298157, 1.0)))))))


@triton.jit
def _nf3_code(n):
    # bucketize(right=True): a value equal to a threshold goes to the upper bucket.
    c = (n >= -0.7675113677978516).to(tl.int32)
    c += (n >= -0.39097706973552704).to(tl.int32)
    c += (n >= -0.1234657019376755).to(tl.int32)
    c += (n >= 0.0916687622666359).to(tl.int32)
    c += (n >= 0.2826657369732857).to(tl.int32)
    c += (n >= 0.5024898052215576).to(tl.int32)
    c += (n >= 0.8114928305149078).to(tl.int32)
    return c


@triton.jit
def _tile(pid, n_groups, G: tl.constexpr, BLOCK_G: tl.constexpr,
          BLOCK_R: tl.constexpr):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    mask = (rows < n_groups)[:, None] & (cols < G)[None, :]
    offs = rows[:, None].to(tl.int64) * G + cols[None, :]
    return offs, mask


@triton.jit
def _fq_kernel(x_ptr, g_ptr, out_ptr, n_groups, G: tl.constexpr, BLOCK_G: tl.constexpr,
               BLOCK_R: tl.constexpr, MODE: tl.constexpr,
               QMIN: tl.constexpr, QMAX: tl.constexpr, INV_QMAX: tl.constexpr,
               FP16_SCALE: tl.constexpr,
               BACKWARD: tl.constexpr, DETACH: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask = _tile(pid, n_groups, G, BLOCK_G, BLOCK_R)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 2:
        amax = tl.max(tl.where(mask, x, float("-inf")), 1)[:, None]
        amin = tl.min(tl.where(mask, x, float("inf")), 1)[:, None]
        mx = _to_scale(tl.maximum(amax, 1e-5), FP16_SCALE)
        mn = _to_scale(tl.maximum(tl.abs(amin), 1e-5), FP16_SCALE)
        pos = x >= 0
        normed = tl.where(pos, tl.math.div_rn(x, mx), tl.math.div_rn(x, mn))
        q = _nf3_level(_nf3_code(normed))
        if BACKWARD:
            grad = g
            if not DETACH:
                d = g * (q - normed)
                gmx = tl.sum(tl.where(pos & mask, d, 0.0), 1)[:, None]
                gmn = tl.sum(tl.where(mask & (x < 0), d, 0.0), 1)[:, None]
                gmx = tl.where(amax >= 1e-5, gmx, 0.0)
                sgn = tl.where(amin > 0, 1.0, tl.where(amin < 0, -1.0, 0.0))
                gmn = tl.where(tl.abs(amin) >= 1e-5, gmn * sgn, 0.0)
                hit_mx = (mask & (x == amax)).to(tl.float32)
                hit_mn = (mask & (x == amin)).to(tl.float32)
                grad += gmx * hit_mx / tl.sum(hit_mx, 1)[:, None]
                grad += gmn * hit_mn / tl.sum(hit_mn, 1)[:, None]
            tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            out = tl.where(pos, q * mx, q * mn)
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), 1)[:, None]
        scale = _to_scale(tl.maximum(absmax, 1e-5) * INV_QMAX, FP16_SCALE)
        v = tl.math.div_rn(x, scale)
        r = _rha(v)
        codes = tl.minimum(tl.maximum(r, QMIN * 1.0), QMAX * 1.0)
        if BACKWARD:
            inside = ((r >= QMIN) & (r <= QMAX)).to(tl.float32)
            grad = g * inside
            if not DETACH:
                gs = tl.sum(g * (codes - v * inside), 1)[:, None] / QMAX
                gs = tl.where(absmax >= 1e-5, gs, 0.0)
                hit = (mask & (tl.abs(x) == absmax)).to(tl.float32)
                sgn = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
                grad += gs * hit / tl.sum(hit, 1)[:, None] * sgn
            tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, (codes * scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mx = tl.max(tl.where(mask, x, float("-inf")), 1)[:, None]
        mn = tl.min(tl.where(mask, x, float("inf")), 1)[:, None]
        scale = _to_scale(tl.maximum(mx - mn, 1e-5) * INV_QMAX, FP16_SCALE)
        zero = tl.minimum(tl.maximum(-_rha(tl.math.div_rn(mn, scale)), 0.0), QMAX * 1.0)
        v = tl.math.div_rn(x, scale)
        r = _rha(v) + zero
        codes = tl.minimum(tl.maximum(r, 0.0), QMAX * 1.0)
        if BACKWARD:
            inside = ((r >= 0) & (r <= QMAX)).to(tl.float32)
            grad = g * inside
            if not DETACH:
                gs = tl.sum(g * ((codes - zero) - v * inside), 1)[:, None] / QMAX
                gs = tl.where(mx - mn >= 1e-5, gs, 0.0)
                hit_mx = (mask & (x == mx)).to(tl.float32)
                hit_mn = (mask & (x == mn)).to(tl.float32)
                grad += gs * (hit_mx / tl.sum(hit_mx, 1)[:, None]
                              - hit_mn / tl.sum(hit_mn, 1)[:, None])
            tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            out = (codes - zero) * scale
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _f32_reciprocal(n: int) -> float:
    # torch on CUDA divides a tensor by a Python scalar as a * (1/b) with 1/b in float32; the
    # scale is computed the same way so the forward stays bit-identical to torch's CUDA ops.
    return torch.tensor(1.0, dtype=torch.float32).div(n).item()


TILE = 4096  # elements per program (whole groups); bench/quant_ste.py --tiles sweeps it


def _launch(x: torch.Tensor, g: torch.Tensor | None, group: int, mode: int, bits: int,
            fp16_scale: bool, detach: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    n_groups = x.numel() // group
    block_g = triton.next_power_of_2(group)
    block_r = max(1, min(64, TILE // block_g))
    grid = (triton.cdiv(n_groups, block_r),)
    if mode == MODE_SYM:
        qmin, qmax = -(2 ** (bits - 1)), max(2 ** (bits - 1) - 1, 1)
    else:
        qmin, qmax = 0, 2**bits - 1
    _fq_kernel[grid](x, g if g is not None else x, out, n_groups, G=group, BLOCK_G=block_g,
                     BLOCK_R=block_r, MODE=mode, QMIN=qmin, QMAX=qmax,
                     INV_QMAX=_f32_reciprocal(qmax), FP16_SCALE=fp16_scale,
                     BACKWARD=g is not None, DETACH=detach and g is not None,
                     num_warps=4 if block_g * block_r <= 4096 else 8)
    return out


class TritonFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, group: int, mode: int, bits: int, fp16_scale: bool,
                detach: bool, out_dtype: torch.dtype | None):
        w = w.contiguous()
        ctx.save_for_backward(w)
        ctx.meta = (group, mode, bits, fp16_scale, detach)
        return _launch(w, None, group, mode, bits, fp16_scale, detach, out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (w,) = ctx.saved_tensors
        group, mode, bits, fp16_scale, detach = ctx.meta
        grad = _launch(w, g.contiguous(), group, mode, bits, fp16_scale, detach)
        return grad, None, None, None, None, None, None


def fake_quantize_triton(w: torch.Tensor, fmt: str, bits: int, group_size: int,
                         symmetric: bool, detach_scales: bool,
                         scale_dtype: torch.dtype | None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same contract as ``fake_quantize`` for a 2-D CUDA weight (checked by the caller); the
    result is in ``out_dtype`` (default ``w``'s), the gradient in ``w``'s dtype."""
    group = w.shape[1] if group_size == -1 else group_size
    mode = MODE_NF3 if fmt == "nf3" else (MODE_SYM if symmetric else MODE_ASYM)
    if scale_dtype not in (None, torch.float16):
        raise ValueError(f"the Triton kernel rounds scales to fp16 or not at all, "
                         f"not {scale_dtype}")
    return TritonFakeQuant.apply(w, group, mode, bits, scale_dtype is torch.float16,
                                 detach_scales, out_dtype)
