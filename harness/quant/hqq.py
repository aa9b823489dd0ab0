"""HQQ (Badri & Shaji 2023): half-quadratic zero-point optimisation, as pure functions.

Reference: ``optimize_weights_proximal_legacy`` in mobiusml/hqq ``hqq/core/optimize.py``. Per
group, the scale comes from min/max as for int asym; the zero point minimises
``||W - dequant(quant(W))||_p^p`` (p = 0.7) by alternating

    W_q = clamp(round(W / s + z)),  W_r = (W_q - z) s,  W_e = shrink_p(W - W_r, beta),
    z = mean_group(W_q - (W - W_e) / s),  beta *= kappa,

stopping after ``iters`` rounds or as soon as the layer's mean |W - W_r| rises. As in the
reference, the zero returned is the last one computed (the one after the round whose error
rose); ``keep_best=True`` returns the zero of the best round instead.

Storage: the harness's int format stores integer zero points at the code width (``IntFormat``
packs them as codes); HQQ's zero is fractional. :func:`hqq_quantize` therefore also returns the
zero rounded to the integer grid, and the weights each gives, so the cost of rounding can be
measured; the stored model uses the rounded one. The scale is the harness's own fp16 scale
(``1 / s`` is HQQ's "scale").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.quant.formats import Format, get_format
from harness.quant.grid import round_half_away
from harness.quant.packed import PackedTensor
from harness.quant.primitives import QParams, grouped, int_params


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the lp "norm" (p <= 1): generalised soft thresholding."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


@torch.no_grad()
def optimize_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, *,
                  lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                  iters: int = 20, keep_best: bool = False) -> tuple[torch.Tensor, int]:
    """The reference's solver on grouped weights ``[..., g]`` with ``scale`` and initial
    fractional ``zero`` ``[..., 1]``. Returns ``(zero, rounds run)``."""
    best_error, best_zero = float("inf"), zero
    rounds = 0
    for _ in range(iters):
        rounds += 1
        w_q = torch.round(wg / scale + zero).clamp(0, qmax)
        w_r = (w_q - zero) * scale
        w_e = shrink_lp(wg - w_r, beta, lp_norm)
        prev = zero
        zero = torch.mean(w_q - (wg - w_e) / scale, dim=-1, keepdim=True)
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
        qparams: codes, fp16 scales and integer zeros (what is stored).
        weight: dequantized stored weight (rounded zero).
        weight_frac: dequantized weight with HQQ's fractional zero (not storable here).
        zero_frac: the optimised fractional zero points.
        rounds: solver rounds run.
    """

    qparams: QParams
    weight: torch.Tensor
    weight_frac: torch.Tensor
    zero_frac: torch.Tensor
    rounds: int


def _check(fmt: Format) -> None:
    if fmt.name != "int" or fmt.symmetric:
        raise HarnessError(f"hqq optimises the zero point of asymmetric int grids, not "
                           f"{fmt.label()}; use fmt=int without symmetric")


@torch.no_grad()
def hqq_quantize(w: torch.Tensor, fmt, *, lp_norm: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iters: int = 20, keep_best: bool = False) -> HQQResult:
    """HQQ of one weight ``[out, in]`` for an int asym format (object or spec).

    Raises:
        HarnessError: a format other than int asym, or a group size that does not divide.
    """
    fmt = get_format(fmt)
    _check(fmt)
    xg = grouped(w.detach().float(), fmt.group_size)
    scale, _, _, qmax = int_params(xg, fmt.bits, False, torch.float16)
    zero0 = -xg.amin(-1, keepdim=True) / scale  # HQQ's start: -min * (1 / s), not rounded
    zero, rounds = optimize_zero(xg, scale, zero0, qmax, lp_norm=lp_norm, beta=beta,
                                 kappa=kappa, iters=iters, keep_best=keep_best)
    w_frac = (torch.round(xg / scale + zero).clamp(0, qmax) - zero) * scale
    z_int = torch.clamp(round_half_away(zero), 0, qmax)
    # the int format's own rounding with an integer zero: what dequantize(stored) gives
    codes = torch.clamp(round_half_away(xg / scale) + z_int, 0, qmax)
    w_int = (codes - z_int) * scale
    q = QParams(codes.to(torch.uint8).reshape(w.shape), scale.squeeze(-1).to(torch.float16),
                z_int.squeeze(-1).to(torch.uint8), fmt.name, fmt.bits, fmt.group_size, False,
                tuple(w.shape))
    return HQQResult(q, w_int.reshape(w.shape), w_frac.reshape(w.shape),
                     zero.squeeze(-1), rounds)


def pack_qparams(q: QParams, fmt) -> PackedTensor:
    """Packs codes and parameters computed elsewhere (``Format.pack`` re-derives them from a
    weight, which for HQQ's zero would undo the optimisation)."""
    fmt = get_format(fmt)
    return PackedTensor(fmt.pack_codes(q.codes), q.scales, fmt.pack_zeros(q.zeros), fmt.name,
                        fmt.bits, fmt.group_size, fmt.symmetric, tuple(q.shape), format=fmt)
