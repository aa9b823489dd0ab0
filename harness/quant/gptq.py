"""GPTQ (Frantar et al. 2022) for one linear layer, as pure functions.

Reference: ``GPTQ.fasterquant`` in IST-DASLab/gptq ``gptq.py``. Given ``W`` ``[out, in]`` and
``H = 2 X^T X / n`` of the layer's calibration inputs, columns are quantized one at a time and
each column's error, scaled by the upper Cholesky factor of ``H^-1``, is fed forward to the
columns not yet quantized; the updates are applied lazily, a block of columns at a time.

Where this follows the column-by-column algorithm rather than the reference's code:

- group parameters are computed, when a column starts a group, from the fully error-updated
  group; the reference reads them from ``W`` (not the block's working copy), which for groups
  narrower than the block misses the updates of the block's earlier columns. Blocks here are
  aligned to groups, so the lazy form gives the column-by-column result.
- ``act_order`` always uses static groups (parameters from the original contiguous groups), so
  a stored group stays a contiguous group of the format.
- ``pin_extremes`` (default on): the harness stores a model by re-deriving each group's
  parameters from the weight's min/max (``Format.quantize``); GPTQ's error feedback can move a
  group's extreme weights off the grid's end codes, after which that re-derivation gives other
  parameters than GPTQ used. Pinning quantizes the element that set a group's min (max) to the
  grid's lowest (highest) level, error fed forward as for any column, so the result is a fixed
  point of the format's quantizer. ``pin_extremes=False`` is the reference's rounding.

The column quantizer needs "quantize these values with these group parameters", which the
format objects do not offer; it is built here on the formats' own parameter math
(``harness.quant.primitives``, ``harness.quant.ternary``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.quant.formats import Format, get_format
from harness.quant.grid import NF3_LEVELS, nf3_codes, round_half_away
from harness.quant.primitives import int_params, nf3_params
from harness.quant.ternary import ternary_scales, ternary_trits

_SCALE_DTYPE = torch.float16  # what packed storage holds, so W_q is what storage gives back


# --- per-group parameters and the column quantizer -----------------------------------------

@dataclass(frozen=True)
class GroupParams:
    """One group's parameters for every row, each ``[out, 1]``, and the values of the
    grid's lowest and highest levels (what pinning writes)."""

    a: torch.Tensor  # int: scale; nf3: positive-side max; ternary: scale
    b: torch.Tensor | None  # int asym: integer zero; nf3: negative-side |min|; else None
    lo: torch.Tensor
    hi: torch.Tensor


def _check_supported(fmt: Format) -> None:
    if fmt.name not in ("int", "nf3", "ternary"):
        raise HarnessError(f"gptq quantizes int, nf3 and ternary grids, not fmt={fmt.name}; "
                           f"pick one of those formats")


def group_params(fmt: Format, wg: torch.Tensor) -> GroupParams:
    """Parameters of the group ``wg`` ``[out, g]`` exactly as ``fmt.quantize`` derives them."""
    x = wg.float().unsqueeze(1)  # [out, 1, g]: the formats' grouped layout
    if fmt.name == "int":
        scale, zero, qmin, qmax = int_params(x, fmt.bits, fmt.symmetric, _SCALE_DTYPE)
        scale = scale.squeeze(1)
        if zero is None:
            # the absmax element decides a symmetric scale: it pins to +-qmax (not qmin)
            return GroupParams(scale, None, -qmax * scale, qmax * scale)
        zero = zero.squeeze(1)
        return GroupParams(scale, zero, (0 - zero) * scale, (qmax - zero) * scale)
    if fmt.name == "nf3":
        mx, mn = nf3_params(x, _SCALE_DTYPE)
        mx, mn = mx.squeeze(1), mn.squeeze(1)
        return GroupParams(mx, mn, NF3_LEVELS[0] * mn, NF3_LEVELS[-1] * mx)
    s = ternary_scales(x, fmt.scaling, _SCALE_DTYPE).squeeze(1)
    return GroupParams(s, None, -s, s)


def quantize_with(fmt: Format, x: torch.Tensor, p: GroupParams,
                  sym_floor: bool = False) -> torch.Tensor:
    """Dequantized values of ``x`` ``[out, k]`` on the grid of ``p``, computed as the format's
    fake quantizer computes them (bit for bit).

    ``sym_floor``: symmetric int stops at ``-qmax`` instead of ``-2^(bits-1)``. A weight the
    error feedback pushed below ``-absmax`` would otherwise take the extra level and become
    the group's new absmax, which re-deriving the scale from the stored weight would not
    give back."""
    x = x.float()
    if fmt.name == "int":
        if p.b is None:
            qmax = 2 ** (fmt.bits - 1) - 1
            qmin = -qmax if sym_floor else -(2 ** (fmt.bits - 1))
            return torch.clamp(round_half_away(x / p.a), qmin, qmax) * p.a
        qmax = 2**fmt.bits - 1
        return (torch.clamp(round_half_away(x / p.a) + p.b, 0, qmax) - p.b) * p.a
    if fmt.name == "nf3":
        pos = (x >= 0).to(x.dtype)
        s = p.a * pos + p.b * (1 - pos)
        levels = torch.tensor(NF3_LEVELS, dtype=x.dtype, device=x.device)
        return levels.take(nf3_codes(x / s).long()) * s
    return ternary_trits(x, p.a) * p.a


def _pin_targets(fmt: Format, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, the group column pinned to ``hi`` and the one pinned to ``lo`` (-1: none).

    Symmetric grids (int sym, ternary absmax) are set by the absmax element alone; it pins to
    the level of its own sign. Ternary absmean has no element that sets its scale: nothing is
    pinned (see :func:`latent_for_storage`)."""
    if fmt.name == "ternary" and fmt.scaling == "absmean":
        return torch.full((wg.shape[0],), -1, dtype=torch.long, device=wg.device), None
    if (fmt.name == "int" and fmt.symmetric) or fmt.name == "ternary":
        return wg.abs().argmax(1), None
    return wg.argmax(1), wg.argmin(1)


def _pinned(q: torch.Tensor, p: GroupParams, j: int, hi_at: torch.Tensor,
            lo_at: torch.Tensor | None, sign: torch.Tensor | None) -> torch.Tensor:
    hit_hi = (hi_at == j).unsqueeze(1)
    if lo_at is None:  # symmetric: the absmax element keeps the sign it had when the group began
        target = torch.where(sign >= 0, p.hi, p.lo) if sign is not None else p.hi
        return torch.where(hit_hi, target, q)
    q = torch.where((lo_at == j).unsqueeze(1), p.lo, q)
    return torch.where(hit_hi, p.hi, q)


# --- the Hessian -----------------------------------------------------------------------------

def accumulate_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running ``H = 2 X^T X / n`` over token rows (the reference divides by sequences; a
    scale of H changes nothing in GPTQ). Returns the new ``(H, n)``."""
    x = x.reshape(-1, x.shape[-1]).float()
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    m = x.shape[0]
    h = h * (n / (n + m)) + (2.0 / (n + m)) * (x.T @ x)
    return h, n + m


# --- the algorithm -------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTQResult:
    """Outcome of :func:`gptq_quantize`.

    Attributes:
        weight: W_q ``[out, in]`` float32, on the format's grid; with ``pin_extremes`` (and any
            format but ternary absmean) ``fmt.quantize`` of it gives it back exactly.
        perm: the column order used (identity without ``act_order``).
        loss: GPTQ's own estimate ``sum (w - q)^2 / d^2 / 2`` over the layer.
    """

    weight: torch.Tensor
    perm: torch.Tensor
    loss: float


def _prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor, damp: float):
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise HarnessError(f"gptq needs weight [out, in] and H [in, in]; got {tuple(w.shape)} "
                           f"and {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise HarnessError("gptq: the Hessian has NaN/inf entries; check the calibration "
                           "inputs (a diverged layer upstream)")
    dead = torch.diag(h) == 0
    # inputs never seen carry no information: any value is as good, and 0 costs nothing
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def _hinv_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    try:
        chol = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        raise HarnessError(f"gptq: H + damping is not positive definite (damp={damp}); "
                           f"raise damp (e.g. 0.1) or calib_samples") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _group_size(fmt: Format, in_f: int) -> int:
    gs = in_f if fmt.group_size == -1 else int(fmt.group_size)
    if gs <= 0 or in_f % gs:
        raise HarnessError(f"group size {fmt.group_size} does not divide the layer's {in_f} "
                           f"inputs; choose a divisor of {in_f} or -1 (per row)")
    return gs


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False,
                  pin_extremes: bool = True) -> GPTQResult:
    """GPTQ of one layer.

    Args:
        weight: ``[out, in]`` (not modified).
        hessian: ``[in, in]``, e.g. from :func:`accumulate_hessian`.
        fmt: a format object or ``QuantFormat`` (int asym/sym, nf3, ternary).
        block_size: columns per lazy batch update (reference 128); rounded to whole groups.
        damp: fraction of mean(diag H) added to the diagonal (reference 0.01).
        act_order: process columns by descending diag(H), groups static.
        pin_extremes: see the module docstring.

    Raises:
        HarnessError: shapes that do not match, an unsupported format, a group size that does
            not divide ``in``, or a Hessian that damping does not make positive definite.
    """
    fmt = get_format(fmt)
    _check_supported(fmt)
    w, h = _prepare_hessian(weight, hessian, damp)
    out_f, n = w.shape
    gs = _group_size(fmt, n)
    perm = torch.arange(n, device=w.device)
    static = act_order or gs == n
    groups: list[tuple[GroupParams, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    if static:  # every group's parameters from the original contiguous groups
        groups = [_group_state(fmt, w[:, g0:g0 + gs], g0, pin_extremes)
                  for g0 in range(0, n, gs)]
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _hinv_upper(h, damp)
    # blocks hold whole groups, so a group's parameters see every update before its start
    bs = max(block_size // gs, 1) * gs if not static else block_size

    q = torch.zeros_like(w)
    losses = torch.zeros_like(w)
    state = None
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            if static:
                state = groups[orig // gs]
            elif col % gs == 0:
                state = _group_state(fmt, w1[:, i:i + gs], col, pin_extremes)
            p, hi_at, lo_at, sign = state
            wc = w1[:, i:i + 1]
            qc = quantize_with(fmt, wc, p, sym_floor=pin_extremes)
            if pin_extremes:
                qc = _pinned(qc, p, orig, hi_at, lo_at, sign)
            d = hinv1[i, i]
            q[:, col] = qc[:, 0]
            losses[:, col] = (wc[:, 0] - qc[:, 0]) ** 2 / d**2
            e = (wc[:, 0] - qc[:, 0]) / d
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        q = q[:, torch.argsort(perm)]
    return GPTQResult(weight=q, perm=perm, loss=float(losses.sum() / 2))


def _group_state(fmt: Format, wg: torch.Tensor, start: int, pin: bool):
    """Params of a group plus, per row, the original column indices pinned to hi / lo and the
    sign the absmax element had (symmetric grids)."""
    p = group_params(fmt, wg)
    hi, lo = _pin_targets(fmt, wg)
    sign = None
    if lo is None and pin:
        rows = torch.arange(wg.shape[0], device=wg.device)
        sign = wg[rows, hi.clamp(min=0)].unsqueeze(1)
    hi = torch.where(hi >= 0, hi + start, hi)
    lo = lo + start if lo is not None else None
    return p, hi, lo, sign


# --- what the harness stores ------------------------------------------------------------

def latent_for_storage(w_q: torch.Tensor, fmt) -> torch.Tensor:
    """A latent weight whose quantization by ``fmt`` is ``w_q``.

    ``w_q`` itself for every pinned grid. Ternary absmean takes each group's scale as the mean
    |latent|, which for trits times ``s`` is ``s * k / g`` (``k`` nonzero trits): the nonzero
    entries are stretched by ``g / k`` so that the mean is ``s`` again while every trit is kept
    (``|t g / k| >= 1`` still rounds to ``t``).
    """
    fmt = get_format(fmt)
    if not (fmt.name == "ternary" and fmt.scaling == "absmean"):
        return w_q
    gs = _group_size(fmt, w_q.shape[1])
    g = w_q.reshape(w_q.shape[0], -1, gs)
    k = (g != 0).sum(-1, keepdim=True).clamp(min=1)
    return (g * (gs / k)).reshape(w_q.shape)


def output_error(weight: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / 2`` = ``||X W^T - X Q^T||^2 / n`` for ``H = 2 X^T X / n``."""
    d = (weight.float() - w_q.float())
    return float(((d @ hessian.float()) * d).sum() / 2)
