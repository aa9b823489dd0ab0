"""Triton kernels for fake quantization on CUDA: one pass forward, one pass backward.

Used by :class:`harness.quant.primitives.FakeQuantizeSTE` when the weight is a CUDA tensor and
Triton imports; this module is imported only then, so CPU code never imports Triton.

Each program handles ``BLOCK_R`` groups (rows of the ``[out * n_groups, group]`` view of the
weight) with the whole group in registers. The forward reads ``w`` once and writes the
fake-quantized weight once (group min/max, scale, zero, codes and dequantization fused); the
backward reads ``w`` and the incoming gradient once and writes the weight gradient once,
recomputing the per-group statistics instead of saving them. That is the memory floor the
bench (``bench/quant_ste.py``) compares against: 2 reads + 2 writes of a weight-sized tensor.

The math is ``primitives._params/_codes/_decode`` (forward) and ``primitives._backward``,
op for op: IEEE division (``div_rn``; Triton's ``/`` may be approximate), scales rounded to
the storage dtype with round-to-nearest-even, round half away from zero. The forward is meant
to match the torch path bit for bit, the backward to float32 rounding (reduction order).
Groups longer than :data:`MAX_GROUP` fall back to the torch path.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path is used instead; see available()
    triton = None

from harness.quant.primitives import EPS, NF3_LEVELS, NF3_THRESHOLDS, check_format, group_view

MAX_GROUP = 8192
_MODES = {"int": 0, "int_sym": 1, "nf3": 2}
_SCALE_CASTS = {None: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 0}


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether Triton imported and CUDA is usable."""
    return triton is not None and torch.cuda.is_available()


def supports(w: torch.Tensor, group_size: int) -> bool:
    """Whether the kernels handle ``w`` (CUDA, float dtype, groups up to MAX_GROUP)."""
    if not (available() and w.is_cuda and w.dim() == 2 and w.is_floating_point()):
        return False
    g = w.shape[1] if group_size == -1 else group_size
    return 0 < g <= MAX_GROUP and w.dtype in (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:
    _T = [tl.constexpr(t) for t in NF3_THRESHOLDS]
    T0, T1, T2, T3, T4, T5, T6 = _T
    _L = [tl.constexpr(v) for v in NF3_LEVELS]
    L0, L1, L2, L3, L4, L5, L6, L7 = _L
    EPS_C = tl.constexpr(EPS)

    @triton.jit
    def _div(x, y):
        # IEEE division; y (a per-group column or a constant) broadcast to x's shape.
        return tl.math.div_rn(x, y + tl.zeros_like(x))

    @triton.jit
    def _round_half_away(v):
        a = tl.math.floor(tl.abs(v) + 0.5)
        return tl.where(v < 0, -a, a)

    @triton.jit
    def _cast_scale(s, SCALE_CAST: tl.constexpr):
        if SCALE_CAST == 1:
            s = s.to(tl.float16).to(tl.float32)
        elif SCALE_CAST == 2:
            s = s.to(tl.bfloat16).to(tl.float32)
        return s

    @triton.jit
    def _nf3_index(n):
        return ((n >= T0).to(tl.int32) + (n >= T1).to(tl.int32) + (n >= T2).to(tl.int32)
                + (n >= T3).to(tl.int32) + (n >= T4).to(tl.int32) + (n >= T5).to(tl.int32)
                + (n >= T6).to(tl.int32))

    @triton.jit
    def _nf3_level(i):
        return tl.where(i == 0, L0, tl.where(i == 1, L1, tl.where(i == 2, L2, tl.where(
            i == 3, L3, tl.where(i == 4, L4, tl.where(i == 5, L5, tl.where(i == 6, L6, L7)))))))

    @triton.jit
    def _load(X, R, G, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < R) & (cols[None, :] < G)
        offs = rows[:, None].to(tl.int64) * G + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        return x, mask, offs

    @triton.jit
    def _stats(x, mask, MODE: tl.constexpr, QMAX: tl.constexpr, SCALE_CAST: tl.constexpr):
        """(a, b, mx, mn): int asym (scale, zero), sym (scale, 0), nf3 (|max|, |min|)."""
        mx = tl.max(tl.where(mask, x, -float("inf")), axis=1)[:, None]
        mn = tl.min(tl.where(mask, x, float("inf")), axis=1)[:, None]
        if MODE == 2:
            a = _cast_scale(tl.maximum(tl.abs(mx), EPS_C), SCALE_CAST)
            b = _cast_scale(tl.maximum(tl.abs(mn), EPS_C), SCALE_CAST)
        elif MODE == 1:
            amax = tl.maximum(tl.abs(mx), tl.abs(mn))
            a = _cast_scale(_div(tl.maximum(amax, EPS_C), QMAX), SCALE_CAST)
            b = tl.zeros_like(a)
        else:
            rng = tl.maximum(mx - mn, EPS_C)
            a = _cast_scale(_div(rng, QMAX), SCALE_CAST)
            b = tl.minimum(tl.maximum(-_round_half_away(_div(mn, a)), 0.0), QMAX)
        return a, b, mx, mn

    @triton.jit
    def _fq_fwd_kernel(X, Y, R, G, MODE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                       SCALE_CAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        x, mask, offs = _load(X, R, G, BLOCK_R, BLOCK_G)
        a, b, mx, mn = _stats(x, mask, MODE, QMAX, SCALE_CAST)
        if MODE == 2:
            pos = x >= 0
            n = tl.where(pos, _div(x, a), _div(x, b))
            lv = _nf3_level(_nf3_index(n))
            out = tl.where(pos, lv * a, lv * b)
        elif MODE == 1:
            c = tl.minimum(tl.maximum(_round_half_away(_div(x, a)), QMIN), QMAX)
            out = c * a
        else:
            r = _round_half_away(_div(x, a)) + b
            out = (tl.minimum(tl.maximum(r, 0.0), QMAX) - b) * a
        tl.store(Y + offs, out.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _fq_bwd_kernel(X, GO, GX, R, G, MODE: tl.constexpr, QMIN: tl.constexpr,
                       QMAX: tl.constexpr, SCALE_CAST: tl.constexpr, DETACH: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        x, mask, offs = _load(X, R, G, BLOCK_R, BLOCK_G)
        g = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
        a, b, mx, mn = _stats(x, mask, MODE, QMAX, SCALE_CAST)
        if MODE == 2:
            grad = g
            if not DETACH:
                pos = x >= 0
                n = tl.where(pos, _div(x, a), _div(x, b))
                err = g * (_nf3_level(_nf3_index(n)) - n)
                g_pos = tl.sum(tl.where(pos & mask, err, 0.0), axis=1)[:, None]
                g_neg = tl.sum(tl.where(mask & (x < 0), err, 0.0), axis=1)[:, None]
                sgn_mx = tl.where(mx > 0, 1.0, tl.where(mx < 0, -1.0, 0.0))
                sgn_mn = tl.where(mn > 0, 1.0, tl.where(mn < 0, -1.0, 0.0))
                g_mx = tl.where(tl.abs(mx) >= EPS_C, g_pos * sgn_mx, 0.0)
                g_mn = tl.where(tl.abs(mn) >= EPS_C, g_neg * sgn_mn, 0.0)
                hit_mx = tl.where(mask & (x == mx), 1.0, 0.0)
                hit_mn = tl.where(mask & (x == mn), 1.0, 0.0)
                grad = (grad + g_mx * hit_mx / tl.sum(hit_mx, axis=1)[:, None]
                        + g_mn * hit_mn / tl.sum(hit_mn, axis=1)[:, None])
        else:
            v = _div(x, a)
            if MODE == 1:
                r = _round_half_away(v)
                inside = (r >= QMIN) & (r <= QMAX)
                c = tl.minimum(tl.maximum(r, QMIN), QMAX)
            else:
                r = _round_half_away(v) + b
                inside = (r >= 0) & (r <= QMAX)
                c = tl.minimum(tl.maximum(r, 0.0), QMAX) - b
            grad = tl.where(inside, g, 0.0)
            if not DETACH:
                term = tl.where(mask, g * (c - tl.where(inside, v, 0.0)), 0.0)
                g_s = tl.sum(term, axis=1)[:, None] / QMAX
                if MODE == 1:
                    ax = tl.abs(x)
                    amax = tl.maximum(tl.abs(mx), tl.abs(mn))
                    hit = tl.where(mask & (ax == amax), 1.0, 0.0)
                    sgn = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
                    g_s = tl.where(amax >= EPS_C, g_s, 0.0)
                    grad = grad + g_s * hit / tl.sum(hit, axis=1)[:, None] * sgn
                else:
                    g_s = tl.where(mx - mn >= EPS_C, g_s, 0.0)
                    hit_mx = tl.where(mask & (x == mx), 1.0, 0.0)
                    hit_mn = tl.where(mask & (x == mn), 1.0, 0.0)
                    grad = (grad + g_s * hit_mx / tl.sum(hit_mx, axis=1)[:, None]
                            - g_s * hit_mn / tl.sum(hit_mn, axis=1)[:, None])
        tl.store(GX + offs, grad.to(GX.dtype.element_ty), mask=mask)


def _launch_args(w: torch.Tensor, fmt: str, bits: int, group_size: int, symmetric: bool,
                 scale_dtype):
    check_format(fmt, bits, symmetric)
    out_f, n_groups, group = group_view(w, group_size).shape
    n_rows = out_f * n_groups
    mode = _MODES["nf3" if fmt == "nf3" else ("int_sym" if symmetric else "int")]
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    if scale_dtype not in _SCALE_CASTS:
        raise ValueError(f"scale_dtype {scale_dtype} is not supported by the Triton kernels")
    block_g = triton.next_power_of_2(group)
    block_r = max(1, min(64, 4096 // block_g))
    meta = dict(MODE=mode, QMIN=qmin, QMAX=qmax, SCALE_CAST=_SCALE_CASTS[scale_dtype],
                BLOCK_R=block_r, BLOCK_G=block_g, num_warps=4 if block_g * block_r <= 4096 else 8)
    return n_rows, group, (triton.cdiv(n_rows, block_r),), meta


def fake_quantize_fwd(w: torch.Tensor, fmt: str, bits: int, group_size: int, symmetric: bool,
                      scale_dtype) -> torch.Tensor:
    """Fake-quantized ``w`` (same shape and dtype), computed in one Triton pass."""
    w = w.contiguous()
    n_rows, group, grid, meta = _launch_args(w, fmt, bits, group_size, symmetric, scale_dtype)
    out = torch.empty_like(w)
    _fq_fwd_kernel[grid](w, out, n_rows, group, **meta)
    return out


def fake_quantize_bwd(w: torch.Tensor, grad_out: torch.Tensor, fmt: str, bits: int,
                      group_size: int, symmetric: bool, scale_dtype,
                      detach_scales: bool) -> torch.Tensor:
    """Gradient of the reference graph with respect to ``w`` (``w``'s dtype), one pass."""
    w, grad_out = w.contiguous(), grad_out.contiguous()
    n_rows, group, grid, meta = _launch_args(w, fmt, bits, group_size, symmetric, scale_dtype)
    grad = torch.empty_like(w)
    _fq_bwd_kernel[grid](w, grad_out, grad, n_rows, group, DETACH=detach_scales, **meta)
    return grad
