"""AWQ's activation-aware scale search (Lin et al. 2023), as pure functions.

Reference: ``auto_scale_block`` / ``_search_module_scale`` in mit-han-lab/llm-awq
``awq/quantize/auto_scale.py``. For a group of linears that share one input ``x`` (q/k/v after
the input norm, gate/up after the post-attention norm, o_proj after v_proj, down_proj after
up_proj), with ``x_mean = mean_tokens |x|`` per input channel, try for ``alpha = i / n_grid``
(``i = 0 .. n_grid - 1``)

    s = x_mean ** alpha,  s = s / sqrt(max(s) * min(s)),  W' = Q(W * s) / s

on every linear of the group, and keep the alpha whose ``W'`` gives the smallest error of the
module that holds the linears (the caller's ``loss``). Ties keep the first alpha, i.e. the
smaller one, as the reference's strict ``<`` does. ``alpha = 0`` is ``s = 1``: plain
quantization, so the search never does worse than it on its own measure.

The chosen ``s`` is then folded so the model stays an ordinary one: the op before the group
divides its output by ``s`` (:func:`fold_into_norm`, :func:`fold_into_rows`) and the linears
multiply their input columns by it (:func:`scale_columns`); in full precision nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from harness.errors import HarnessError

#: The reference clamps ``x_mean ** alpha`` from below so that a dead channel (mean 0) does not
#: give a zero scale (a division by zero in the fold).
MIN_SCALE = 1e-4


@dataclass(frozen=True)
class ScaleResult:
    """Outcome of :func:`search_scales`.

    Attributes:
        scales: the chosen per-input-channel scales ``s``, ``[in]``, float32.
        alpha: the chosen exponent.
        err_plain: the loss at ``alpha = 0`` (plain quantization, ``s = 1``).
        err_best: the loss at the chosen alpha.
        errors: the loss at every alpha of the grid, in order.
    """

    scales: torch.Tensor
    alpha: float
    err_plain: float
    err_best: float
    errors: tuple[float, ...]


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """``mean |x|`` per input channel over every token (``x``: ``[..., in]``), float32."""
    return x.detach().reshape(-1, x.shape[-1]).float().abs().mean(0)


def alpha_grid(n_grid: int) -> list[float]:
    """The reference's exponents ``i / n_grid`` for ``i < n_grid``: 0 included, 1 excluded."""
    if n_grid < 1:
        raise HarnessError(f"awq_grid={n_grid}: use at least 1 (1 = alpha 0 only, plain clip)")
    return [i / n_grid for i in range(n_grid)]


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x_mean ** alpha``, normalised by ``sqrt(max * min)`` as the reference does: the scales
    straddle 1, so neither the folded weights nor the folded norm drift far in magnitude."""
    s = x_mean.float().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(weight: torch.Tensor, scales: torch.Tensor, fmt) -> torch.Tensor:
    """``Q(W * s) / s`` in float32: what the layer computes once ``s`` is folded and quantized.

    Args:
        weight: ``[out, in]``.
        scales: ``[in]``, multiplies the input columns.
        fmt: a format object (``QuantFormat.format()``) with ``fake_quantize``.
    """
    s = scales.to(device=weight.device, dtype=torch.float32).view(1, -1)
    # fp16 scales: what packed storage holds, so the search sees the stored model's weights.
    return fmt.fake_quantize(weight.detach().float() * s, scale_dtype=torch.float16) / s


def linears_output_error(x: torch.Tensor, weights: Sequence[torch.Tensor],
                         candidates: Sequence[torch.Tensor]) -> float:
    """``sum_linears mean((x W^T - x W'^T)^2)``: the group's error measured at the linears'
    outputs, for when the module holding them cannot be run on its own."""
    xf = x.reshape(-1, x.shape[-1]).float()
    return sum(float((xf @ (c.float() - w.float()).T).pow(2).mean())
               for w, c in zip(weights, candidates, strict=True))


@torch.no_grad()
def search_scales(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], fmt,
                  loss: Callable[[list[torch.Tensor]], float], n_grid: int = 20) -> ScaleResult:
    """Searches the AWQ scale of one group of linears sharing an input.

    Args:
        x_mean: :func:`activation_mean` of the group's input, ``[in]``.
        weights: the group's ``[out_i, in]`` weights (not modified).
        fmt: the format object whose ``fake_quantize`` the stored model will apply.
        loss: maps the candidate weights ``Q(W_i * s) / s`` (same order as ``weights``) to the
            error of the module holding them, e.g. the mean squared difference of the attention
            block's output from its full-precision output.
        n_grid: number of exponents tried, ``alpha = i / n_grid`` (reference 20).

    Returns:
        A :class:`ScaleResult`.

    Raises:
        HarnessError: no weights, or a weight whose input width is not ``x_mean``'s.
    """
    if not weights:
        raise HarnessError("search_scales needs at least one weight of the group")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x_mean.numel():
            raise HarnessError(f"search_scales: weight {tuple(w.shape)} does not take the "
                               f"{x_mean.numel()} input channels of x_mean; pass [out, in] weights")
    errors: list[float] = []
    best_err, best_alpha, best_s = float("inf"), 0.0, None
    for alpha in alpha_grid(n_grid):
        s = awq_scales(x_mean, alpha)
        err = float(loss([scaled_fake_quant(w, s, fmt) for w in weights]))
        errors.append(err)
        if err < best_err:  # strict: ties keep the smaller alpha, as the reference does
            best_err, best_alpha, best_s = err, alpha, s
    if best_s is None:  # every loss was NaN/inf: s = 1 leaves the weights as plain quant does
        best_s, best_alpha, best_err = awq_scales(x_mean, 0.0), 0.0, errors[0]
    return ScaleResult(scales=best_s, alpha=best_alpha, err_plain=errors[0], err_best=best_err,
                       errors=tuple(errors))


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W * s`` per input column, in ``weight``'s dtype (the linears' side of the fold)."""
    s = scales.to(device=weight.device, dtype=torch.float32).view(1, -1)
    return (weight.float() * s).to(weight.dtype)


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                   scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The norm's affine ``(weight, bias)`` divided by ``s``: its output is ``y / s``.

    Valid for norms whose output is ``gamma * normed (+ beta)`` (RMSNorm, LayerNorm); a norm
    scaled by ``1 + gamma`` (Gemma) would need another fold.
    """
    if weight.dim() != 1 or weight.numel() != scales.numel():
        raise HarnessError(f"cannot fold AWQ scales ({scales.numel()}) into a norm weight of "
                           f"shape {tuple(weight.shape)}; the norm must feed the scaled linears")
    s = scales.to(device=weight.device, dtype=torch.float32)
    new_bias = None if bias is None else (bias.float() / s).to(bias.dtype)
    return (weight.float() / s).to(weight.dtype), new_bias


def fold_into_rows(weight: torch.Tensor, bias: torch.Tensor | None,
                   scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A preceding linear's output rows (and bias) divided by ``s``: its output is ``y / s``.

    Only exact when the rows feed the scaled linears channel for channel (v_proj -> o_proj
    without grouped-query repetition, up_proj -> down_proj through the elementwise gate).
    """
    if weight.dim() != 2 or weight.shape[0] != scales.numel():
        raise HarnessError(f"cannot fold AWQ scales ({scales.numel()}) into the rows of a "
                           f"{tuple(weight.shape)} weight; its outputs must be the scaled inputs")
    s = scales.to(device=weight.device, dtype=torch.float32)
    new_bias = None if bias is None else (bias.float() / s).to(bias.dtype)
    return (weight.float() / s.view(-1, 1)).to(weight.dtype), new_bias
