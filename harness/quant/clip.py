"""BitDistiller's asymmetric clipping search (AWQ-style auto-clip), as a pure function.

Reference: ``auto_2clip_layer`` in DD-DuDa/BitDistiller ``quantization/autoclip.py``. For every
output row and every input group ``g`` of a linear layer, with calibration inputs ``X`` of that
layer, try the ranges ``[min_g (1 - i/n_grid), max_g (1 - j/n_grid)]`` for
``i, j = 0 .. int(max_shrink * n_grid) - 1`` (defaults: 10 x 10 = 100 pairs, shrink
0, .05, ..., .45) and keep the pair minimising the group's share of the output error

    mean_tokens (X_g W_g^T - X_g Q(clamp(W_g))^T)^2,

``Q`` being the layer's fake quantizer. Ties keep the first pair in the reference's loop order
(max shrink outer, min shrink inner), i.e. the least clipping. The weight is clamped once.

Token sampling: the reference keeps every ``n // 512``-th token (at least 512 of them); here
``seed=None`` does the same and stops at ``n_tokens``, an integer seed draws ``n_tokens`` rows
at random (the harness already samples its tokens that way, see ``methods/clip.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import HarnessError
from harness.quant.formats import fake_quantize

#: Name fragments of the layers the reference leaves unclipped (``auto_clip_block``: "due to qk
#: bmm, it is hard to clip precisely"): q_proj and k_proj in llama-style models.
REFERENCE_SKIPPED = ("q_", "k_", "query", "key", "Wqkv")


def reference_skips(module_name: str) -> bool:
    """Whether the reference's autoclip skips a layer, by its own name (``q_proj``, not the
    qualified one: a block named e.g. ``block_sparse_moe`` would match ``k_`` otherwise)."""
    return any(part in module_name for part in REFERENCE_SKIPPED)


@dataclass(frozen=True)
class ClipResult:
    """Outcome of :func:`clip_search`.

    Attributes:
        weight: the clamped weight, a new tensor shaped and typed like the input.
        err_before: layer-output MSE of the quantized unclipped weight,
            ``mean((X W^T - X Q(W)^T)^2)`` over tokens and outputs.
        err_after: the same for the clipped weight.
        max_val: chosen upper bound per (output row, input group), ``[out, n_groups]``.
        min_val: chosen lower bound, same shape.
    """

    weight: torch.Tensor
    err_before: float
    err_after: float
    max_val: torch.Tensor
    min_val: torch.Tensor


def _sample_tokens(x: torch.Tensor, n_tokens: int, seed: int | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    if n <= n_tokens:
        return x
    if seed is None:  # the reference's stride, truncated so every layer sees n_tokens rows
        return x[:: n // n_tokens][:n_tokens]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:n_tokens].sort().values
    return x[idx.to(x.device)]


def _quantize(w: torch.Tensor, qformat) -> torch.Tensor:
    if hasattr(qformat, "format"):  # a QuantFormat spec: its format object does the math
        return fake_quantize(w, qformat.format())
    return fake_quantize(w, fmt=qformat.fmt, bits=qformat.bits, group_size=qformat.group_size,
                         symmetric=qformat.symmetric)


class _GroupError:
    """``mean_tokens (X_g d_g^T)^2`` for every (row, group) of a weight difference ``d``.

    Through the per-group Gram matrix ``X_g^T X_g / n`` when a group is narrower than the token
    count (``d H d^T``: ``gs`` instead of ``n`` multiply-adds per weight, 8x fewer for g64 with
    512 tokens), else directly. Both are the reference's quantity.
    """

    def __init__(self, x: torch.Tensor, n_groups: int, group_size: int) -> None:
        self.xg = x.reshape(x.shape[0], n_groups, group_size)
        self.gram = None
        if group_size < x.shape[0]:
            self.gram = torch.einsum("ngk,ngl->gkl", self.xg, self.xg) / x.shape[0]

    def __call__(self, d: torch.Tensor) -> torch.Tensor:  # d: [rows, n_groups, group_size]
        if self.gram is not None:
            return (torch.einsum("rgk,gkl->rgl", d, self.gram) * d).sum(-1)
        return torch.einsum("ngk,rgk->rng", self.xg, d).pow(2).mean(1)


@torch.no_grad()
def clip_search(weight: torch.Tensor, x: torch.Tensor, qformat, *, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, batch_out: int = 128,
                seed: int | None = 0) -> ClipResult:
    """Searches per-group clipping ranges of one linear layer's weight.

    Args:
        weight: ``[out, in]`` weight (not modified).
        x: calibration inputs of the layer, ``[n, in]`` (or ``[..., in]``).
        qformat: a ``harness.quant.formats.QuantFormat`` (fmt, bits, group_size, symmetric);
            ``group_size = -1`` means one group per row.
        n_grid: shrink step is ``1 / n_grid`` (reference 20).
        max_shrink: shrinks go up to, excluding, this fraction (reference 0.5); with
            ``n_grid`` it gives ``int(max_shrink * n_grid)`` steps for max and for min.
        n_tokens: calibration tokens used (reference 512).
        batch_out: output rows searched at once; bounds memory to about
            ``batch_out * n_tokens * n_groups`` floats.
        seed: token sampling seed, ``None`` for the reference's stride.

    Returns:
        A :class:`ClipResult` with the clamped weight and the output errors.

    Raises:
        HarnessError: shapes that do not match, or a group size that does not divide ``in``.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        raise HarnessError(f"clip_search needs weight [out, in] and inputs [n, in]; got "
                           f"{tuple(weight.shape)} and {tuple(x.shape)}")
    out_f, in_f = weight.shape
    gs = in_f if qformat.group_size in (-1, None) else int(qformat.group_size)
    if gs <= 0 or in_f % gs:
        raise HarnessError(f"group size {gs} does not divide the layer's {in_f} inputs; "
                           f"choose a divisor of {in_f} or -1 (per row)")
    ng = in_f // gs
    steps = int(max_shrink * n_grid + 1e-9)  # reference: range(int(max_shrink * n_grid))
    if steps < 1:
        raise HarnessError(f"clip grid is empty (max_shrink={max_shrink}, n_grid={n_grid}); "
                           f"use max_shrink * n_grid >= 1")
    shrinks = [i / n_grid for i in range(steps)]

    xs = _sample_tokens(x, n_tokens, seed).to(device=weight.device, dtype=torch.float32)
    group_err = _GroupError(xs, ng, gs)
    w_all = weight.detach().float()
    max_all, min_all, clipped = [], [], []
    sq_before = sq_after = 0.0
    for lo in range(0, out_f, batch_out):
        w = w_all[lo : lo + batch_out]
        wg = w.reshape(-1, ng, gs)
        org_max, org_min = wg.amax(-1), wg.amin(-1)
        best_err = torch.full_like(org_max, float("inf"))
        best_max, best_min = org_max.clone(), org_min.clone()
        # All min-shrink candidates of one max-shrink go through one fake-quantize call on a
        # stacked [S * rows, in] tensor: the same math, ~S times fewer kernel launches.
        min_vals = torch.stack([org_min * (1 - s_min) for s_min in shrinks])  # [S, rows, ng]
        n_s = len(shrinks)
        for s_max in shrinks:
            max_val = org_max * (1 - s_max)
            cur = torch.clamp(wg.unsqueeze(0), min_vals.unsqueeze(-1),
                              max_val.unsqueeze(0).unsqueeze(-1))
            q = _quantize(cur.reshape(n_s * w.shape[0], in_f), qformat)
            d = q.reshape(n_s, *wg.shape) - wg.unsqueeze(0)
            errs = group_err(d.reshape(n_s * wg.shape[0], ng, gs)).reshape(n_s, *org_max.shape)
            for i in range(n_s):  # in order, strict <: ties keep the smaller shrink
                better = errs[i] < best_err
                best_err = torch.where(better, errs[i], best_err)
                best_max = torch.where(better, max_val, best_max)
                best_min = torch.where(better, min_vals[i], best_min)
        w_clip = torch.clamp(wg, best_min.unsqueeze(-1), best_max.unsqueeze(-1))
        w_clip = w_clip.reshape(w.shape).to(weight.dtype)
        # Full-layer output error (cross-group terms included), of what is returned.
        sq_before += float((xs @ (_quantize(w, qformat) - w).T).pow(2).sum())
        sq_after += float((xs @ (_quantize(w_clip.float(), qformat) - w).T).pow(2).sum())
        max_all.append(best_max)
        min_all.append(best_min)
        clipped.append(w_clip)
    denom = float(xs.shape[0] * out_f)
    return ClipResult(weight=torch.cat(clipped), err_before=sq_before / denom,
                      err_after=sq_after / denom, max_val=torch.cat(max_all),
                      min_val=torch.cat(min_all))
