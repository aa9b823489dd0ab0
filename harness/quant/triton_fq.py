"""Fused fake-quantization + STE for CUDA in Triton: one pass forward, one pass backward.

The reference graph (``fake_quantize(..., fused=False)``) launches ~20 kernels and keeps their
outputs for autograd; here each program loads a tile of whole groups once, computes the group
parameters in registers and writes the result. When a gradient is needed the forward also
writes each group's max and min (8 bytes per group, ~6% of a bf16 g64 weight), so the backward
skips those two reductions and recomputes scale, reciprocal and zero point per group.

Gradients are those of the reference autograd graph (see ``harness.quant.fused`` for the
derivation): straight-through inside the code range, plus the gradient into the group's max/min
(split evenly among tied elements, as torch's amax/amin do) unless scales are detached. NF3:

    out = where(x >= 0, q * mx, q * mn),  d out/dx = 1,  d out/d mx = q - x/mx  (x >= 0),
    d out/d mn = q - x/mn  (x < 0),  mx = max(amax, 1e-5),  mn = max(|amin|, 1e-5).

Divisions keep the reference's formulas (``x / scale``, ``range / qmax``, ``min / scale``) and
their correctly rounded results, so the forward is bit-identical to ``harness.quant.primitives``
on any device: per group the kernel takes IEEE divisions (``div_rn``), per element it divides
through the group's correctly rounded reciprocal plus one FMA correction (``_div``), which is
exact and costs three operations instead of a full division. FMA contraction is off at launch
so no other expression is fused behind the reference's back. Many weights can share one launch
(``fake_quantize_many``, used by ``harness.quant.batched``). Imported only when a CUDA weight is
fake-quantized; the core never needs Triton. On the CPU, ``TRITON_INTERPRET=1`` runs the same
kernels (tests/quant/test_triton_interpret.py); bench/kernel_sass.py counts their instructions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MODE_ASYM, MODE_SYM, MODE_NF3 = 0, 1, 2


@triton.jit
def _rha(v):
    # Round half away from zero: sign(v) * floor(|v| + 0.5), as primitives.round_half_away.
    r = tl.floor(tl.abs(v) + 0.5)
    return tl.where(v < 0, -r, r)


@triton.jit
def _to_scale(raw, FP16_SCALE: tl.constexpr):
    if FP16_SCALE:
        raw = raw.to(tl.float16).to(tl.float32)
    return raw


@triton.jit
def _nf3_q(n):
    # Level of the bucket n falls in, as a balanced tree of selects (a chain of seven keeps
    # seven predicates live per element and compiles to ~60% more instructions).
    # bucketize(right=True): a value equal to a threshold goes to the upper bucket.
    lo = tl.where(n >= -0.39097706973552704,
                  tl.where(n >= -0.1234657019376755, 0.0, -0.2469314038753510),
                  tl.where(n >= -0.7675113677978516, -0.5350227355957031, -1.0))
    hi = tl.where(n >= 0.5024898052215576,
                  tl.where(n >= 0.8114928305149078, 1.0, 0.6229856610298157),
                  tl.where(n >= 0.2826657369732857, 0.3819939494132996, 0.1833375245332718))
    return tl.where(n >= 0.0916687622666359, hi, lo)


@triton.jit
def _tile(pid, n_groups, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
          BIG: tl.constexpr, EVEN: tl.constexpr):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    if EVEN:  # every tile full: constant-true masks, which the compiler drops
        row_ok = tl.full([BLOCK_R], 1, tl.int1)
        mask = tl.full([BLOCK_R, BLOCK_G], 1, tl.int1)
    else:
        row_ok = rows < n_groups
        mask = row_ok[:, None] & (cols < G)[None, :]
    if BIG:  # more than 2^31 elements: 64-bit offsets
        offs = rows[:, None].to(tl.int64) * G + cols[None, :]
    else:
        offs = rows[:, None] * G + cols[None, :]
    return rows, row_ok, offs, mask


@triton.jit
def _div(x, s, inv):
    # x / s correctly rounded, from the correctly rounded reciprocal inv = RN(1/s): the FMA
    # residual x - q*s is exact and one correction step gives RN(x/s) (Markstein's theorem;
    # the fast path of CUDA's own div.rn). Three operations instead of a division per element.
    q = x * inv
    return tl.fma(tl.fma(-q, s, x), inv, q)


@triton.jit
def _params(mx, mn, MODE: tl.constexpr, QMAX: tl.constexpr, FP16_SCALE: tl.constexpr):
    """Per-group (scale, 1/scale, zero, 1/scale) from the group's max and min; NF3: (max,
    1/max, |min|, 1/|min|), clamped and rounded like the scales."""
    if MODE == 2:
        a = _to_scale(tl.maximum(mx, 1e-5), FP16_SCALE)
        b = _to_scale(tl.maximum(tl.abs(mn), 1e-5), FP16_SCALE)
        return a, tl.math.div_rn(1.0, a), b, tl.math.div_rn(1.0, b)
    if MODE == 1:
        scale = _to_scale(tl.math.div_rn(tl.maximum(tl.maximum(mx, -mn), 1e-5), QMAX * 1.0),
                          FP16_SCALE)
        inv = tl.math.div_rn(1.0, scale)
        return scale, inv, 0.0 * scale, inv
    scale = _to_scale(tl.math.div_rn(tl.maximum(mx - mn, 1e-5), QMAX * 1.0), FP16_SCALE)
    inv = tl.math.div_rn(1.0, scale)
    zero = tl.minimum(tl.maximum(-_rha(tl.math.div_rn(mn, scale)), 0.0), QMAX * 1.0)
    return scale, inv, zero, inv


@triton.jit
def _fwd_tile(pid, x_ptr, out_ptr, stats_ptr, n_groups, G: tl.constexpr,
              BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr,
              QMIN: tl.constexpr, QMAX: tl.constexpr,
              FP16_SCALE: tl.constexpr, SAVE: tl.constexpr, BIG: tl.constexpr,
              EVEN: tl.constexpr):
    rows, row_ok, offs, mask = _tile(pid, n_groups, G, BLOCK_G, BLOCK_R, BIG, EVEN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mx = tl.max(tl.where(mask, x, float("-inf")), 1)
    mn = tl.min(tl.where(mask, x, float("inf")), 1)
    if SAVE:
        tl.store(stats_ptr + 2 * rows, mx, mask=row_ok)
        tl.store(stats_ptr + 2 * rows + 1, mn, mask=row_ok)
    a, inv_a, b, inv_b = _params(mx, mn, MODE, QMAX, FP16_SCALE)
    if MODE == 2:
        pos = x >= 0
        s = tl.where(pos, a[:, None], b[:, None])
        q = _nf3_q(_div(x, s, tl.where(pos, inv_a[:, None], inv_b[:, None])))
        out = q * s
    elif MODE == 1:
        v = _div(x, a[:, None], inv_a[:, None])
        codes = tl.minimum(tl.maximum(_rha(v), QMIN * 1.0), QMAX * 1.0)
        out = codes * a[:, None]
    else:
        # clamp(r + z, 0, qmax) - z == clamp(r, -z, qmax - z) exactly: small integers in fp32.
        zero = b[:, None]
        v = _div(x, a[:, None], inv_a[:, None])
        out = tl.minimum(tl.maximum(_rha(v), -zero), QMAX - zero) * a[:, None]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(pid, x_ptr, g_ptr, gx_ptr, stats_ptr, n_groups, G: tl.constexpr,
              BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr,
              QMIN: tl.constexpr, QMAX: tl.constexpr,
              FP16_SCALE: tl.constexpr, DETACH: tl.constexpr, BIG: tl.constexpr,
              EVEN: tl.constexpr):
    rows, row_ok, offs, mask = _tile(pid, n_groups, G, BLOCK_G, BLOCK_R, BIG, EVEN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mx = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
    mn = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    a, inv_a, b, inv_b = _params(mx, mn, MODE, QMAX, FP16_SCALE)
    mx2, mn2 = mx[:, None], mn[:, None]
    # Gradients into a group's max/min go to the elements attaining them, split over ties:
    # per-row coefficient (gradient / tie count), then one select per element.
    if MODE == 2:
        # The caller skips the launch when scales are detached (the gradient is g).
        pos = x >= 0
        normed = _div(x, tl.where(pos, a[:, None], b[:, None]),
                      tl.where(pos, inv_a[:, None], inv_b[:, None]))
        d = g * (_nf3_q(normed) - normed)
        gmx = tl.sum(tl.where(pos & mask, d, 0.0), 1)
        # x < 0 as "not pos" (the same for any non-NaN weight): the compiler reuses pos's
        # predicate (a compare of its own: 6% more instructions, 38 more registers in bf16)
        gmn = tl.sum(tl.where(pos | ~mask, 0.0, d), 1)
        gmx = tl.where(mx >= 1e-5, gmx, 0.0)
        gmn = tl.where(mn <= -1e-5, -gmn, tl.where(mn >= 1e-5, gmn, 0.0))  # d|mn|/dmn
        hit_mx = mask & (x == mx2)
        hit_mn = mask & (x == mn2)
        c_mx = gmx / tl.sum(hit_mx.to(tl.float32), 1)
        c_mn = gmn / tl.sum(hit_mn.to(tl.float32), 1)
        grad = g + tl.where(hit_mx, c_mx[:, None], 0.0) + tl.where(hit_mn, c_mn[:, None], 0.0)
    elif MODE == 1:
        v = _div(x, a[:, None], inv_a[:, None])
        r = _rha(v)
        inside = (r >= QMIN) & (r <= QMAX)
        grad = tl.where(inside, g, 0.0)
        if not DETACH:
            codes = tl.minimum(tl.maximum(r, QMIN * 1.0), QMAX * 1.0)
            absmax = tl.maximum(mx, -mn)
            gs = tl.sum(g * (codes - tl.where(inside, v, 0.0)), 1) / QMAX
            gs = tl.where(absmax >= 1e-5, gs, 0.0)
            hit = mask & (tl.abs(x) == absmax[:, None])
            c = gs / tl.sum(hit.to(tl.float32), 1)
            # d|x|/dx = sign(x) (0 at 0)
            grad += tl.where(hit & (x > 0), c[:, None], 0.0)
            grad -= tl.where(hit & (x < 0), c[:, None], 0.0)
    else:
        zero = b[:, None]
        v = _div(x, a[:, None], inv_a[:, None])
        r = _rha(v)
        inside = (r >= -zero) & (r <= QMAX - zero)
        grad = tl.where(inside, g, 0.0)
        if not DETACH:
            shifted = tl.minimum(tl.maximum(r, -zero), QMAX - zero)  # codes - zero
            gs = tl.sum(g * (shifted - tl.where(inside, v, 0.0)), 1) / QMAX
            gs = tl.where(mx - mn >= 1e-5, gs, 0.0)
            hit_mx = mask & (x == mx2)
            hit_mn = mask & (x == mn2)
            c_mx = gs / tl.sum(hit_mx.to(tl.float32), 1)
            c_mn = gs / tl.sum(hit_mn.to(tl.float32), 1)
            grad += tl.where(hit_mx, c_mx[:, None], 0.0) - tl.where(hit_mn, c_mn[:, None], 0.0)
    tl.store(gx_ptr + offs, grad.to(gx_ptr.dtype.element_ty), mask=mask)


# One tensor per launch (fake_quantize on a CUDA weight).
@triton.jit
def _fq_fwd(x_ptr, out_ptr, stats_ptr, n_groups, G: tl.constexpr, BLOCK_G: tl.constexpr,
            BLOCK_R: tl.constexpr, MODE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
            FP16_SCALE: tl.constexpr, SAVE: tl.constexpr,
            BIG: tl.constexpr, EVEN: tl.constexpr):
    _fwd_tile(tl.program_id(0), x_ptr, out_ptr, stats_ptr, n_groups, G, BLOCK_G, BLOCK_R, MODE,
              QMIN, QMAX, FP16_SCALE, SAVE, BIG, EVEN)


@triton.jit
def _fq_bwd(x_ptr, g_ptr, gx_ptr, stats_ptr, n_groups, G: tl.constexpr, BLOCK_G: tl.constexpr,
            BLOCK_R: tl.constexpr, MODE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
            FP16_SCALE: tl.constexpr, DETACH: tl.constexpr,
            BIG: tl.constexpr, EVEN: tl.constexpr):
    _bwd_tile(tl.program_id(0), x_ptr, g_ptr, gx_ptr, stats_ptr, n_groups, G, BLOCK_G, BLOCK_R,
              MODE, QMIN, QMAX, FP16_SCALE, DETACH, BIG, EVEN)


# Many tensors per launch (harness.quant.batched): row t of the int64 table holds tensor t's
# addresses, its group count and its first program; map[pid] is the tensor program pid works
# on. Addresses arrive as integers, so alignment (checked by the caller) is restated for
# vectorized loads; the prototypes only carry the element types.
@triton.jit
def _ptr(row, i, proto):
    return tl.multiple_of(tl.load(row + i).to(tl.pointer_type(proto.dtype.element_ty)), 16)


@triton.jit
def _fq_fwd_many(table_ptr, map_ptr, x_proto, out_proto, G: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr,
                 QMIN: tl.constexpr, QMAX: tl.constexpr,
                 FP16_SCALE: tl.constexpr, SAVE: tl.constexpr, BIG: tl.constexpr,
                 EVEN: tl.constexpr):
    pid = tl.program_id(0)
    row = table_ptr + 5 * tl.load(map_ptr + pid).to(tl.int64)
    stats_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    _fwd_tile(pid - tl.load(row + 4).to(tl.int32), _ptr(row, 0, x_proto),
              _ptr(row, 1, out_proto), stats_ptr, tl.load(row + 3).to(tl.int32), G, BLOCK_G,
              BLOCK_R, MODE, QMIN, QMAX, FP16_SCALE, SAVE, BIG, EVEN)


@triton.jit
def _fq_bwd_many(table_ptr, map_ptr, x_proto, g_proto, G: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr,
                 QMIN: tl.constexpr, QMAX: tl.constexpr,
                 FP16_SCALE: tl.constexpr, DETACH: tl.constexpr, BIG: tl.constexpr,
                 EVEN: tl.constexpr):
    # Table rows: x, g, gx (x's dtype), stats, n_groups, first program.
    pid = tl.program_id(0)
    row = table_ptr + 6 * tl.load(map_ptr + pid).to(tl.int64)
    stats_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    _bwd_tile(pid - tl.load(row + 5).to(tl.int32), _ptr(row, 0, x_proto),
              _ptr(row, 1, g_proto), _ptr(row, 2, x_proto), stats_ptr,
              tl.load(row + 4).to(tl.int32), G, BLOCK_G, BLOCK_R, MODE, QMIN, QMAX,
              FP16_SCALE, DETACH, BIG, EVEN)


# Launch shape; bench/quant_ste.py --configs sweeps TILE and WARPS on a GPU.
TILE = 4096  # elements per program (whole groups, at most MAX_ROWS of them)
WARPS = 0  # warps per program; 0: 4 up to 4096 elements, else 8
MAX_ROWS = 64


@functools.cache
def _config(big: bool, group: int, mode: int, bits: int, fp16_scale: bool, tile: int,
            warps: int, max_rows: int) -> dict:
    """Launch keywords shared by every kernel; cached (callers never mutate it)."""
    block_g = triton.next_power_of_2(group)
    block_r = max(1, min(max_rows, tile // block_g))
    if mode == MODE_SYM:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return dict(G=group, BLOCK_G=block_g, BLOCK_R=block_r, MODE=mode, QMIN=qmin, QMAX=qmax,
                FP16_SCALE=fp16_scale, BIG=big,
                num_warps=warps or (4 if block_g * block_r <= 4096 else 8),
                enable_fp_fusion=False)


def _launch_config(big: bool, group: int, mode: int, bits: int, fp16_scale: bool) -> dict:
    return _config(big, group, mode, bits, fp16_scale, TILE, WARPS, MAX_ROWS)


def _even(n_groups: int, cfg: dict) -> bool:
    return cfg["BLOCK_G"] == cfg["G"] and n_groups % cfg["BLOCK_R"] == 0


class TritonFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, group: int, mode: int, bits: int, fp16_scale: bool,
                detach: bool, out_dtype: torch.dtype | None):
        w = w.contiguous()
        cfg = _launch_config(w.numel() >= 2**31, group, mode, bits, fp16_scale)
        n_groups = w.numel() // group
        save = ctx.needs_input_grad[0] and not (detach and mode == MODE_NF3)
        stats = torch.empty(n_groups, 2, device=w.device, dtype=torch.float32) if save else w
        out = torch.empty_like(w, dtype=out_dtype or w.dtype)
        grid = (triton.cdiv(n_groups, cfg["BLOCK_R"]),)
        _fq_fwd[grid](w, out, stats, n_groups, SAVE=save, EVEN=_even(n_groups, cfg), **cfg)
        if save:
            ctx.save_for_backward(w, stats)
        ctx.meta = (cfg, n_groups, detach, mode, w.dtype)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cfg, n_groups, detach, mode, w_dtype = ctx.meta
        if detach and mode == MODE_NF3:  # straight-through and nothing into the scales
            return g.to(w_dtype), None, None, None, None, None, None
        w, stats = ctx.saved_tensors
        gx = torch.empty_like(w)
        grid = (triton.cdiv(n_groups, cfg["BLOCK_R"]),)
        _fq_bwd[grid](w, g.contiguous(), gx, stats, n_groups, DETACH=detach,
                      EVEN=_even(n_groups, cfg), **cfg)
        return gx, None, None, None, None, None, None


@functools.cache
def _program_map(n_groups: tuple[int, ...], block_r: int, device: torch.device):
    """(program -> tensor index on ``device``, first program of each tensor, programs)."""
    counts = [triton.cdiv(n, block_r) for n in n_groups]
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    owner = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                    torch.tensor(counts))
    return owner.to(device), firsts, sum(counts)


def _table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: the copy does not stall the host
        t = t.pin_memory().to(device, non_blocking=True)
    return t


def aligned(t: torch.Tensor) -> bool:
    """Contiguous and 16-byte aligned: what the many-tensor kernels assume of every address."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


class TritonFakeQuantMany(torch.autograd.Function):
    """Fake-quantizes several weights (same dtype, device and group width) in one launch per
    pass; ``apply(spec, *weights)`` returns one output per weight. Each output and gradient is
    bit-identical to :class:`TritonFakeQuant`'s for the same weight."""

    @staticmethod
    def forward(ctx, spec: tuple, *ws: torch.Tensor):
        group, mode, bits, fp16_scale, detach, out_dtype = spec
        if not all(aligned(w) for w in ws):
            raise ValueError("every weight must be contiguous and 16-byte aligned")
        dev = ws[0].device
        cfg = _launch_config(any(w.numel() >= 2**31 for w in ws), group, mode, bits, fp16_scale)
        n_groups = tuple(w.numel() // group for w in ws)
        owner, firsts, programs = _program_map(n_groups, cfg["BLOCK_R"], dev)
        save = any(ctx.needs_input_grad[1:]) and not (detach and mode == MODE_NF3)
        outs = [torch.empty_like(w, dtype=out_dtype or w.dtype) for w in ws]
        stats = (torch.empty(sum(n_groups), 2, device=dev, dtype=torch.float32) if save
                 else ws[0])  # (never written without SAVE)
        starts = [8 * sum(n_groups[:i]) for i in range(len(ws))]  # bytes into stats
        table = _table([[w.data_ptr(), o.data_ptr(), stats.data_ptr() + s, n, f]
                        for w, o, s, n, f in zip(ws, outs, starts, n_groups, firsts,
                                                 strict=True)], dev)
        even = all(_even(n, cfg) for n in n_groups)
        _fq_fwd_many[(programs,)](table, owner, ws[0], outs[0], SAVE=save, EVEN=even, **cfg)
        if save:
            ctx.save_for_backward(*ws, stats)
        ctx.meta = (cfg, n_groups, starts, detach, mode, even, outs[0].dtype, ws[0].dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        cfg, n_groups, starts, detach, mode, even, out_dtype, w_dtype = ctx.meta
        if detach and mode == MODE_NF3:  # straight-through and nothing into the scales
            return (None, *(None if g is None else g.to(w_dtype) for g in grads))
        *ws, stats = ctx.saved_tensors
        # An output nobody used gets no gradient; a gradient may be a strided or offset view.
        gs = [torch.zeros_like(w, dtype=out_dtype) if g is None
              else g if aligned(g) else g.clone(memory_format=torch.contiguous_format)
              for w, g in zip(ws, grads, strict=True)]
        gxs = [torch.empty_like(w) for w in ws]
        dev = ws[0].device
        owner, firsts, programs = _program_map(n_groups, cfg["BLOCK_R"], dev)
        table = _table([[w.data_ptr(), g.data_ptr(), gx.data_ptr(), stats.data_ptr() + s, n, f]
                        for w, g, gx, s, n, f in zip(ws, gs, gxs, starts, n_groups, firsts,
                                                     strict=True)], dev)
        _fq_bwd_many[(programs,)](table, owner, ws[0], gs[0], DETACH=detach, EVEN=even, **cfg)
        return (None, *gxs)


def fake_quantize_many(ws: list[torch.Tensor], fmt: str, bits: int, group_size: int,
                       symmetric: bool, detach_scales: bool, scale_dtype: torch.dtype | None,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """``fake_quantize_triton`` for several 2-D weights at once: one kernel launch and one
    autograd node per pass. All must share dtype, device and (with ``group_size=-1``) width,
    and be contiguous and 16-byte aligned (:func:`aligned`)."""
    group = ws[0].shape[1] if group_size == -1 else group_size
    if any(w.shape[1] % group or w.dtype != ws[0].dtype or w.device != ws[0].device
           for w in ws):
        raise ValueError("weights of one batch must share dtype, device and group width")
    mode = MODE_NF3 if fmt == "nf3" else (MODE_SYM if symmetric else MODE_ASYM)
    spec = (group, mode, bits, scale_dtype is torch.float16, detach_scales, out_dtype)
    return TritonFakeQuantMany.apply(spec, *ws)


def fake_quantize_triton(w: torch.Tensor, fmt: str, bits: int, group_size: int,
                         symmetric: bool, detach_scales: bool,
                         scale_dtype: torch.dtype | None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same contract as ``fake_quantize`` for a 2-D weight (checked by the caller); the
    result is in ``out_dtype`` (default ``w``'s), the gradient in ``w``'s dtype."""
    group = w.shape[1] if group_size == -1 else group_size
    mode = MODE_NF3 if fmt == "nf3" else (MODE_SYM if symmetric else MODE_ASYM)
    if scale_dtype not in (None, torch.float16):
        raise ValueError(f"the Triton kernel rounds scales to fp16 or not at all, "
                         f"not {scale_dtype}")
    return TritonFakeQuant.apply(w, group, mode, bits, scale_dtype is torch.float16,
                                 detach_scales, out_dtype)
