"""HQQ (Badri & Shaji 2023): half-quadratic zero-point optimisation, as pure functions.

Reference: mobiusml/hqq 0.2.8 (``hqq/core/quantize.py`` ``Quantizer.quantize`` with
``optimize=True``, whose solver is ``optimize_weights_proximal_legacy`` in
``hqq/core/optimize.py``), followed step for step; ``tests/quant/test_hqq_reference.py``
checks the scales, zeros and codes against the installed package. Per group (the reference's
``axis=1``: consecutive inputs of a row, as ``BaseQuantizeConfig`` sets it), with HQQ's
inverse scale ``t = 1 / s``:

    t = qmax / (max - min)   (1 where max - min <= 1e-4; at most 2e4),  z = -min * t
    (z = round(z) first with ``round_zero``: ``BaseQuantizeConfig``'s default at 4 bits only)
    repeat ``iters`` times:
        W_q = clamp(round(W t + z)),  W_r = (W_q - z) / t,  W_e = shrink_p(W - W_r, beta),
        z = mean_group(W_q - (W - W_e) t),  beta *= kappa
        stop when the tensor's mean |W - W_r| did not fall
    codes = clamp(round(W t + z)),  scale = 1 / t

``kappa`` defaults to 1, i.e. beta stays at 10: the reference's default solver
(``optimize_weights_proximal_legacy`` in 0.2.8) never grows beta, although its
``opt_params`` name ``kappa=1.01`` (only the experimental ``optimize_weights_proximal_v2``
applies it). With
beta = 10 and p = 0.7 the shrinkage zeroes every residual below ~0.17 in magnitude, so on LLM
weights ``W_e`` is almost all zero and the update is ``z = mean(W_q - W t)``.

all in float32 (the reference's dtype on the CPU; on CUDA it runs float16). The zero
returned is the last one computed (the one after the round whose error rose); ``keep_best``
returns the zero of the best round instead. ``round`` is torch's (half to even) as there.

Storage (``harness.quant.intfz``, the default): codes, fp16 scale and the fractional zero in
fp16, which is what the reference's ``HQQLinear`` holds (its meta-data cast to the fp16
compute dtype). ``fmt=int`` asym is the int-storage variant: the zero rounded to the integer
grid (``IntFormat`` packs zeros as codes) and the codes re-derived on that grid; measured, this
gives RTN's error back, so it is kept for comparison only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.quant.formats import Format, get_format
from harness.quant.grid import round_half_away
from harness.quant.packed import PackedTensor
from harness.quant.primitives import QParams, grouped

#: the formats HQQ stores to: fractional fp16 zeros (default) or the int-storage variant
HQQ_FORMATS = ("intfz", "int")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the lp "norm" (p <= 1): generalised soft thresholding."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


def initial_params(wg: torch.Tensor, bits: int, round_zero: bool = False):
    """The reference's start from min/max of groups ``[..., g]``: HQQ's inverse scale ``t``
    and zero ``-min * t`` (``[..., 1]``, float32)."""
    qmax = 2**bits - 1
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    denom = mx - mn
    inv = qmax / denom
    inv = torch.where(denom.abs() <= 1e-4, torch.full_like(inv, 1.0), inv).clamp(max=2e4)
    zero = -mn * inv
    if round_zero:
        zero = torch.round(zero)
    return inv, zero


@torch.no_grad()
def optimize_zero(wg: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, qmax: int, *,
                  lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.0,
                  iters: int = 20, keep_best: bool = False) -> tuple[torch.Tensor, int]:
    """The reference's solver (``optimize_weights_proximal_legacy``) on grouped weights
    ``[..., g]`` with HQQ's inverse scale ``inv_scale = 1 / s`` and initial fractional
    ``zero`` ``[..., 1]``. Returns ``(zero, rounds run)``."""
    best_error, best_zero = float("inf"), zero
    rounds = 0
    for _ in range(iters):
        rounds += 1
        w_q = torch.round(wg * inv_scale + zero).clamp(0, qmax)
        w_r = (w_q - zero) / inv_scale
        w_e = shrink_lp(wg - w_r, beta, lp_norm)
        prev = zero
        zero = torch.mean(w_q - (wg - w_e) * inv_scale, dim=-1, keepdim=True)
        beta *= kappa
        error = float((wg - w_r).abs().mean())
        if error < best_error:
            best_error, best_zero = error, prev
        else:
            break
    return (best_zero if keep_best else zero), rounds


@dataclass(frozen=True)
class HQQResult:
    """Outcome of :func:`hqq_quantize`. Tensors are ``[out, in]`` or ``[out, n_groups]``.

    Attributes:
        qparams: what is stored in ``fmt`` (intfz: codes, fp16 scales, fp16 zeros; int:
            codes and integer zeros on the int grid).
        weight: dequantized stored weight.
        weight_frac: dequantized weight with the fractional zero, fp16 scale and zero (the
            intfz storage; equals ``weight`` there).
        zero_frac: the optimised fractional zero points, float32 (the reference's ``zero``).
        scale: ``1 / t`` in float32 (the reference's ``scale`` before its fp16 cast).
        codes_frac: the reference's ``W_q`` (codes for the fractional zero), uint8.
        rounds: solver rounds run.
    """

    qparams: QParams
    weight: torch.Tensor
    weight_frac: torch.Tensor
    zero_frac: torch.Tensor
    scale: torch.Tensor
    codes_frac: torch.Tensor
    rounds: int


def _check(fmt: Format) -> None:
    if fmt.name not in HQQ_FORMATS or fmt.symmetric:
        raise HarnessError(f"hqq optimises the zero point of asymmetric integer grids, not "
                           f"{fmt.label()}; use fmt=intfz (fractional zeros, the default) or "
                           f"fmt=int without symmetric")


@torch.no_grad()
def hqq_quantize(w: torch.Tensor, fmt, *, lp_norm: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.0, iters: int = 20, keep_best: bool = False,
                 round_zero: bool | None = None) -> HQQResult:
    """HQQ of one weight ``[out, in]`` stored in ``fmt`` (intfz or int asym; object or spec).

    ``round_zero``: round the starting zero ``-min * t`` (the solver's zero stays fractional);
    ``None`` is the reference's ``BaseQuantizeConfig`` default, True at 4 bits only.

    Raises:
        HarnessError: another format, or a group size that does not divide.
    """
    fmt = get_format(fmt)
    _check(fmt)
    if round_zero is None:
        round_zero = fmt.bits == 4
    qmax = 2**fmt.bits - 1
    xg = grouped(w.detach().float(), fmt.group_size)
    inv, zero0 = initial_params(xg, fmt.bits, round_zero)
    zero, rounds = optimize_zero(xg, inv, zero0, qmax, lp_norm=lp_norm, beta=beta,
                                 kappa=kappa, iters=iters, keep_best=keep_best)
    codes = torch.round(xg * inv + zero).clamp(0, qmax)  # the reference's final W_q
    scale = 1.0 / inv
    s16, z16 = scale.to(torch.float16), zero.to(torch.float16)
    w_frac = (codes - z16.float()) * s16.float()
    if fmt.name == "intfz":
        stored_codes, stored_zero, w_stored = codes, z16, w_frac
    else:  # int storage: the zero on the integer grid, codes re-derived the int format's way
        stored_zero = torch.clamp(round_half_away(zero), 0, qmax)
        stored_codes = torch.clamp(round_half_away(xg / s16.float()) + stored_zero, 0, qmax)
        w_stored = (stored_codes - stored_zero) * s16.float()
        stored_zero = stored_zero.to(torch.uint8)
    q = QParams(stored_codes.to(torch.uint8).reshape(w.shape), s16.squeeze(-1),
                stored_zero.squeeze(-1), fmt.name, fmt.bits, fmt.group_size, False,
                tuple(w.shape))
    return HQQResult(q, w_stored.reshape(w.shape), w_frac.reshape(w.shape), zero.squeeze(-1),
                     scale.squeeze(-1), codes.to(torch.uint8).reshape(w.shape), rounds)


def latent_with_pinned_ends(q: QParams) -> torch.Tensor:
    """A latent weight that the format's own min/max quantizer (what a trained method's
    training form applies) maps to ``q``'s scales and zeros: ``q`` dequantized, with each
    group's smallest and largest weight moved to the grid's end codes (0 and ``2^b - 1``), the
    min and max that give back the stored scale and zero. The other weights keep their codes;
    the two moved ones change by the codes they lacked to reach the ends (HQQ's shifted zero
    usually leaves one end a code short)."""
    qmax = 2**q.bits - 1
    codes = grouped(q.codes.float(), q.group_size).clone()
    flat = codes.reshape(-1, codes.shape[-1])
    lo, hi = flat.argmin(-1, keepdim=True), flat.argmax(-1, keepdim=True)
    spread = (lo != hi).float()  # a constant group has no two ends to move
    flat.scatter_(-1, lo, torch.where(spread.bool(), 0.0, flat.gather(-1, lo)))
    flat.scatter_(-1, hi, torch.where(spread.bool(), float(qmax), flat.gather(-1, hi)))
    scale = q.scales.float().unsqueeze(-1)
    zero = q.zeros.float().unsqueeze(-1)
    return ((codes - zero) * scale).reshape(q.shape)


def pack_qparams(q: QParams, fmt) -> PackedTensor:
    """Packs codes and parameters computed elsewhere (``Format.pack`` re-derives them from a
    weight, which for HQQ's zero would undo the optimisation)."""
    fmt = get_format(fmt)
    return PackedTensor(fmt.pack_codes(q.codes), q.scales, fmt.pack_zeros(q.zeros), fmt.name,
                        fmt.bits, fmt.group_size, fmt.symmetric, tuple(q.shape), format=fmt)
