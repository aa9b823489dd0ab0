"""Pure quantization primitives: fake-quantize (STE), quantize, dequantize.

Formulas are METHODS.md's ("RTN", "NF3 asymmetric"). Groups run along each row's input
dimension (``w`` is ``[out, in]``, ``group_size=-1`` = whole row); unlike the reference code
they never span two rows, because real storage formats do not. All arithmetic runs in float32
and the result is cast back to ``w.dtype``. No module state, no I/O.

Three views of the same math, kept bit-identical in the forward pass:

- :func:`fake_quantize_reference`: the formulas op by op, as the papers' code writes them
  (BitDistiller ``quantization/quantizer.py``: ``Round`` = sign*floor(|x|+0.5) with an
  identity backward, scales from group min/max, not detached). Autograd records ~20 nodes.
- :class:`FakeQuantizeSTE`: one autograd Function whose backward is the reference graph's
  gradient in closed form (see ``_backward``); it saves only ``w``. On CUDA it runs the
  Triton kernels of :mod:`harness.quant.kernels`.
- :func:`quantize` / :func:`dequantize`: integer codes + fp16 scales, such that
  ``dequantize(quantize(w)) == fake_quantize(w, scale_dtype=torch.float16)`` bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from harness.errors import HarnessError

#: BitDistiller's "n2f3" levels (METHODS.md); index 3 is zero.
NF3_LEVELS = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718,
              0.3819939494132996, 0.6229856610298157, 1.0)
#: Midpoints between consecutive levels; a value >= threshold k gets level k+1.
NF3_THRESHOLDS = (-0.7675113677978516, -0.39097706973552704, -0.1234657019376755,
                  0.0916687622666359, 0.2826657369732857, 0.5024898052215576,
                  0.8114928305149078)
#: Floor on a group's range (int) or side maximum (nf3): the reference code's 1e-5 clamp.
#: It also keeps the all-zero group finite: scale 1e-5/qmax, every code at the zero point.
EPS = 1e-5


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Rounds half away from zero: ``sign(x) * floor(|x| + 0.5)``.

    ``torch.round`` rounds half to even (2.5 -> 2); the reference code's ``Round`` does not.
    """
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Forward: :func:`round_half_away`. Backward: identity (straight-through estimator).

    ``x + (r - x).detach()`` equals ``r`` exactly: ``|r - x| <= 0.5`` makes the subtraction
    exact (Sterbenz), so the STE never perturbs the forward value.
    """
    return x + (round_half_away(x) - x).detach()


def check_format(fmt: str, bits: int, symmetric: bool = False) -> None:
    """Validates a (fmt, bits, symmetric) triple for fake quantization.

    Raises:
        HarnessError: unknown format, bits out of range, or symmetric 1-bit (whose grid
            {-1, 0} * scale cannot represent positive weights).
    """
    if fmt not in ("int", "nf3"):
        raise HarnessError(f"format {fmt!r} has no fake quantizer; use int or nf3 (binary is "
                           f"OneBit's layer, harness.quant.onebit)")
    if fmt == "int" and not 1 <= bits <= 8:
        raise HarnessError(f"bits={bits} is outside 1-8 for integer formats; pick 1..8")
    if fmt == "int" and symmetric and bits < 2:
        raise HarnessError("symmetric 1-bit integers have only the codes {-1, 0}; use "
                           "symmetric=False for int1 or OneBit's binary format")
    if fmt == "nf3" and bits != 3:
        raise HarnessError(f"nf3 is a 3-bit format, got bits={bits}; set bits=3 or use fmt=int")
    if fmt == "nf3" and symmetric:
        raise HarnessError("nf3 has its own asymmetric grid; drop symmetric=True")


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, in // group, group]`` (groups along each row).

    Raises:
        HarnessError: ``w`` is not 2-D, or ``group_size`` does not divide ``in``.
    """
    if w.dim() != 2:
        raise HarnessError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    if g <= 0 or in_f % g:
        from harness.quant.formats import valid_group_sizes

        raise HarnessError(f"group size {group_size} does not divide the input dimension "
                           f"{in_f}; use one of {valid_group_sizes([in_f])}")
    return w.reshape(out_f, in_f // g, g)


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _div(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t / k`` as an IEEE division on every device.

    CUDA turns division by a Python scalar into multiplication by its fp32 reciprocal, which
    can differ by one ulp; dividing by a tensor keeps true division, so CPU, CUDA, the Triton
    kernels and packed storage all compute the same scale bit for bit.
    """
    return t / torch.tensor(float(k), dtype=t.dtype, device=t.device)


def _cast(s: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """The value a scale has once stored in ``scale_dtype`` (fp16 storage), back in fp32."""
    return s if scale_dtype is None else s.to(scale_dtype).float()


def _ste_cast(s: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """:func:`_cast` with an identity gradient (the reference's view of fp16 storage)."""
    return s if scale_dtype is None else s + (_cast(s, scale_dtype) - s).detach()


# --- per-group parameters (no autograd; shared by the fused path and quantize) -------------
def _params(x: torch.Tensor, fmt: str, bits: int, symmetric: bool, scale_dtype):
    """Scale-like tensors ``[out, n_groups, 1]``: int asym (scale, zero), int sym (scale,
    None), nf3 (positive-side |max|, negative-side |min|)."""
    qmin, qmax = _qrange(bits, symmetric)
    if fmt == "nf3":
        pos = _cast(x.amax(-1, keepdim=True).abs().clamp(min=EPS), scale_dtype)
        neg = _cast(x.amin(-1, keepdim=True).abs().clamp(min=EPS), scale_dtype)
        return pos, neg
    if symmetric:
        return _cast(_div(x.abs().amax(-1, keepdim=True).clamp(min=EPS), qmax), scale_dtype), None
    rng = x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
    scale = _cast(_div(rng.clamp(min=EPS), qmax), scale_dtype)
    zero = torch.clamp(-round_half_away(x.amin(-1, keepdim=True) / scale), 0, qmax)
    return scale, zero


def _codes(x: torch.Tensor, fmt: str, bits: int, symmetric: bool, a, b) -> torch.Tensor:
    """Float codes: int asym in [0, qmax], int sym in [qmin, qmax], nf3 level index 0..7."""
    if fmt == "nf3":
        normed = torch.where(x >= 0, x / a, x / b)
        th = torch.tensor(NF3_THRESHOLDS, dtype=x.dtype, device=x.device)
        # right=True: a value equal to a threshold takes the upper level (METHODS.md).
        return torch.bucketize(normed, th, right=True).to(x.dtype)
    qmin, qmax = _qrange(bits, symmetric)
    r = round_half_away(x / a)
    return torch.clamp(r, qmin, qmax) if b is None else torch.clamp(r + b, 0, qmax)


def _decode(codes: torch.Tensor, fmt: str, a, b) -> torch.Tensor:
    """Float codes -> weights; the one expression both fake and real dequantization use."""
    if fmt == "nf3":
        levels = torch.tensor(NF3_LEVELS, dtype=torch.float32, device=codes.device)
        lv = levels[codes.long()]
        return torch.where(codes >= 3, lv * a, lv * b)
    return codes * a if b is None else (codes - b) * a


# --- the reference graph ----------------------------------------------------------------
def fake_quantize_reference(w: torch.Tensor, fmt: str = "int", bits: int = 3,
                            group_size: int = 128, symmetric: bool = False, *,
                            detach_scales: bool = False,
                            scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fake quantization written op by op, as the BitDistiller code does; autograd differentiates it.

    Same arguments and result as :func:`fake_quantize`. This is the specification the fused
    path's analytic backward is tested against, and the "ref" column of
    ``bench/quant_ste.py``. Differences from the reference code, all deliberate: groups stay
    within rows, nf3's |max| and |min| are floored at 1e-5 (the code divides 0/0 on a
    one-signed group), the zero point uses round-half-away like the weights.
    """
    check_format(fmt, bits, symmetric)
    x = group_view(w.float(), group_size)
    qmin, qmax = _qrange(bits, symmetric)
    if fmt == "nf3":
        # SteN2F3Quantizer: split by sign, divide each side by its |extreme|, snap, rescale.
        s_pos = _ste_cast(x.amax(-1, keepdim=True).abs().clamp(min=EPS), scale_dtype)
        s_neg = _ste_cast(x.amin(-1, keepdim=True).abs().clamp(min=EPS), scale_dtype)
        if detach_scales:
            s_pos, s_neg = s_pos.detach(), s_neg.detach()
        zeros = torch.zeros_like(x)
        q_pos = torch.where(x >= 0, x, zeros) / s_pos
        q_neg = torch.where(x < 0, x, zeros) / s_neg
        th = torch.tensor(NF3_THRESHOLDS, device=x.device)
        levels = torch.tensor(NF3_LEVELS, device=x.device)
        snap_pos = levels[torch.bucketize(q_pos.detach(), th, right=True)]
        snap_neg = levels[torch.bucketize(q_neg.detach(), th, right=True)]
        q_pos = q_pos + (snap_pos - q_pos).detach()
        q_neg = q_neg + (snap_neg - q_neg).detach()
        out = q_pos * s_pos + q_neg * s_neg
    elif symmetric:
        scale = _ste_cast(_div(x.abs().amax(-1, keepdim=True).clamp(min=EPS), qmax),
                          scale_dtype)
        if detach_scales:
            scale = scale.detach()
        out = torch.clamp(ste_round(x / scale), qmin, qmax) * scale
    else:
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        scale = _ste_cast(_div((mx - mn).clamp(min=EPS), qmax), scale_dtype)
        if detach_scales:
            scale = scale.detach()
        # The code's zero uses torch.round, whose derivative is 0: detaching is the same graph.
        zero = torch.clamp(-round_half_away(mn / scale), 0, qmax).detach()
        out = (torch.clamp(ste_round(x / scale) + zero, 0, qmax) - zero) * scale
    return out.reshape(w.shape).to(w.dtype)


# --- the fused path -----------------------------------------------------------------------
def _split_ties(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """amax/amin's backward: the group's gradient shared evenly by the elements attaining it."""
    hit = (x == target).float()
    return hit / hit.sum(-1, keepdim=True)


def _forward(x: torch.Tensor, fmt: str, bits: int, symmetric: bool, scale_dtype) -> torch.Tensor:
    a, b = _params(x, fmt, bits, symmetric, scale_dtype)
    return _decode(_codes(x, fmt, bits, symmetric, a, b), fmt, a, b)


def _backward(x: torch.Tensor, g: torch.Tensor, fmt: str, bits: int, symmetric: bool,
              scale_dtype, detach_scales: bool) -> torch.Tensor:
    """The reference graph's gradient, recomputed from ``x`` (grouped fp32) and ``g``.

    Int asym, with v = x/s, c = clamp(round(v) + z), out = (c - z) s, z constant:
      d out/dx = [0 <= round(v) + z <= qmax]  (STE through round, clamp's inclusive mask)
      d out/ds = (c - z) - inside * v;  s = max(max - min, eps)/qmax  -> +-1/qmax into
      max/min where max - min >= eps (clamp passes at equality).
    Int sym: the same with z = 0 and s = max(max|x|, eps)/qmax; d|x|/dx = sign(x).
    NF3: d out/dx = 1; d out/d s_side = sum over that side of (level - x/s_side); the sides'
    scales are |max| and |min| (sign of the extreme, floored at eps).
    The fp16 rounding of scales is straight-through, as in the reference.
    """
    a, b = _params(x, fmt, bits, symmetric, scale_dtype)
    if fmt == "nf3":
        grad = g.clone()
        if detach_scales:
            return grad
        pos = x >= 0
        normed = torch.where(pos, x / a, x / b)
        th = torch.tensor(NF3_THRESHOLDS, device=x.device)
        levels = torch.tensor(NF3_LEVELS, device=x.device)
        err = g * (levels[torch.bucketize(normed, th, right=True)] - normed)
        g_pos = torch.where(pos, err, 0.0).sum(-1, keepdim=True)
        g_neg = torch.where(pos, 0.0, err).sum(-1, keepdim=True)
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        g_mx = g_pos * (mx.abs() >= EPS) * torch.sign(mx)
        g_mn = g_neg * (mn.abs() >= EPS) * torch.sign(mn)
        return grad + g_mx * _split_ties(x, mx) + g_mn * _split_ties(x, mn)
    qmin, qmax = _qrange(bits, symmetric)
    v = x / a
    r = round_half_away(v) if b is None else round_half_away(v) + b
    inside = (r >= (qmin if b is None else 0)) & (r <= qmax)
    grad = torch.where(inside, g, 0.0)
    if detach_scales:
        return grad
    c = r.clamp(qmin, qmax) if b is None else r.clamp(0, qmax) - b
    g_s = (g * (c - torch.where(inside, v, 0.0))).sum(-1, keepdim=True) / qmax
    if symmetric:
        amax = x.abs().amax(-1, keepdim=True)
        return grad + (g_s * (amax >= EPS)) * _split_ties(x.abs(), amax) * torch.sign(x)
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    g_s = g_s * ((mx - mn) >= EPS)
    return grad + g_s * (_split_ties(x, mx) - _split_ties(x, mn))


def _use_triton(w: torch.Tensor, group_size: int) -> bool:
    # Triton is imported only for CUDA tensors; HARNESS_TRITON=0 forces the torch path.
    if not w.is_cuda or os.environ.get("HARNESS_TRITON", "1") == "0":
        return False
    from harness.quant import kernels

    return kernels.supports(w, group_size)


class FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization with the reference graph's exact gradient in closed form.

    ``apply(w, fmt, bits, group_size, symmetric, detach_scales, scale_dtype)``. Saves only
    ``w`` (the parameter itself, no copy); the backward recomputes the per-group statistics,
    which costs one extra read of ``w`` and saves the reference's ~10 saved intermediates.
    """

    @staticmethod
    def forward(ctx, w, fmt, bits, group_size, symmetric, detach_scales, scale_dtype):
        ctx.save_for_backward(w)
        ctx.args = (fmt, bits, group_size, symmetric, scale_dtype, detach_scales)
        if _use_triton(w, group_size):
            from harness.quant import kernels

            return kernels.fake_quantize_fwd(w, fmt, bits, group_size, symmetric, scale_dtype)
        x = group_view(w.float(), group_size)
        return _forward(x, fmt, bits, symmetric, scale_dtype).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (w,) = ctx.saved_tensors
        fmt, bits, group_size, symmetric, scale_dtype, detach_scales = ctx.args
        if _use_triton(w, group_size):
            from harness.quant import kernels

            grad = kernels.fake_quantize_bwd(w, grad_out, fmt, bits, group_size, symmetric,
                                             scale_dtype, detach_scales)
        else:
            x = group_view(w.float(), group_size)
            g = group_view(grad_out.float(), group_size)
            grad = _backward(x, g, fmt, bits, symmetric, scale_dtype, detach_scales)
            grad = grad.reshape(w.shape).to(w.dtype)
        return grad, None, None, None, None, None, None


def fake_quantize(w: torch.Tensor, fmt: str = "int", bits: int = 3, group_size: int = 128,
                  symmetric: bool = False, *, detach_scales: bool = False,
                  scale_dtype: torch.dtype | None = None, fused: bool = True) -> torch.Tensor:
    """Quantize-dequantize ``w`` with straight-through rounding.

    Args:
        w: ``[out, in]`` weight, any float dtype.
        fmt: ``"int"`` or ``"nf3"``.
        bits: 1-8 for int (2-8 when symmetric), 3 for nf3.
        group_size: group length along the input dimension; -1 = whole row.
        symmetric: int only. scale = max|w| / (2^(b-1) - 1), codes in [-2^(b-1), 2^(b-1)-1];
            an all-zero group gets scale 1e-5 / qmax and quantizes to zeros.
        detach_scales: stop gradients into scales (group min/max). By default they flow, as
            in the reference code and METHODS.md.
        scale_dtype: round scales (nf3: |max|, |min|) to this dtype before computing zeros and
            codes; ``torch.float16`` gives exactly what packed storage dequantizes to.
        fused: use :class:`FakeQuantizeSTE` (default); ``False`` records the reference graph.

    Returns:
        Tensor of ``w``'s shape and dtype.

    Raises:
        HarnessError: bad format or bits, or a group size that does not divide the input dim.
    """
    check_format(fmt, bits, symmetric)
    group_view(w, group_size)
    if not fused:
        return fake_quantize_reference(w, fmt, bits, group_size, symmetric,
                                       detach_scales=detach_scales, scale_dtype=scale_dtype)
    return FakeQuantizeSTE.apply(w, fmt, bits, group_size, symmetric, detach_scales, scale_dtype)


# --- real quantization ---------------------------------------------------------------------
@dataclass
class QParams:
    """Integer codes and their parameters.

    Attributes:
        codes: uint8 ``[out, in]``; symmetric codes offset by 2^(bits-1) to be unsigned; nf3
            codes index :data:`NF3_LEVELS`.
        scales: ``[out, n_groups]`` in the scale dtype (nf3: the positive side's |max|).
        zeros: uint8 ``[out, n_groups]`` zero points (int asymmetric), else None.
        neg_scales: nf3 only: the negative side's |min|, like ``scales``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: str
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]
    neg_scales: torch.Tensor | None = None


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str = "int", bits: int = 3, group_size: int = 128,
             symmetric: bool = False, scale_dtype: torch.dtype = torch.float16) -> QParams:
    """Codes and parameters of ``w``.

    Args:
        w: ``[out, in]`` weight.
        fmt, bits, group_size, symmetric: as in :func:`fake_quantize`.
        scale_dtype: storage dtype of the scales.

    Returns:
        :class:`QParams` with ``dequantize(quantize(w)) == fake_quantize(w,
        scale_dtype=scale_dtype)`` exactly.

    Raises:
        HarnessError: as :func:`fake_quantize`.
    """
    check_format(fmt, bits, symmetric)
    x = group_view(w.detach().float(), group_size)
    a, b = _params(x, fmt, bits, symmetric, scale_dtype)
    codes = _codes(x, fmt, bits, symmetric, a, b)
    if symmetric:
        codes = codes + 2 ** (bits - 1)
    zeros = b.squeeze(-1).to(torch.uint8) if fmt == "int" and b is not None else None
    neg = b.squeeze(-1).to(scale_dtype) if fmt == "nf3" else None
    return QParams(codes.to(torch.uint8).reshape(w.shape), a.squeeze(-1).to(scale_dtype), zeros,
                   fmt, bits, group_size, symmetric, (int(w.shape[0]), int(w.shape[1])), neg)


def dequantize(q: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights from :class:`QParams`, computed in float32 exactly as :func:`fake_quantize`.

    Args:
        q: codes and parameters from :func:`quantize` (or unpacked storage).
        dtype: result dtype.

    Returns:
        ``[out, in]`` tensor of ``dtype``.
    """
    codes = group_view(q.codes, q.group_size).float()
    a = q.scales.float().unsqueeze(-1)
    if q.fmt == "nf3":
        b = q.neg_scales.float().unsqueeze(-1)
    elif q.symmetric:
        codes, b = codes - 2 ** (q.bits - 1), None
    else:
        b = q.zeros.float().unsqueeze(-1)
    return _decode(codes, q.fmt, a, b).reshape(q.shape).to(dtype)
