"""ParetoQ's weight grids as harness formats (Liu et al. 2025, arXiv 2502.02631).

Every grid is ``level(W / alpha) * alpha`` with ``alpha`` one scale per row (per group along the
input dimension with ``group_size > 0``), learnable in training. Forward and backward follow the
reference code, facebookresearch/ParetoQ ``models/utils_quant.py``, whose ``QuantizeLinear``
sends ``w_bits`` 2 and 0 (ternary) to ``StretchedElasticQuant`` and 1, 3, 4 to
``LsqBinaryTernaryExtension``; hence three formats:

- ``lsq`` (1, 3, 4 bits). 1 bit: ``sign(W) * alpha``, alpha initialised to ``mean|W|``. 3-4
  bits: ``clamp(round(W / alpha), -2^(b-1), 2^(b-1) - 1) * alpha``, alpha initialised to
  ``max|W| / (2^(b-1) - 1)``.
- ``seq`` (2 bits, stretched elastic quantization): ``(round(clamp(W / alpha, -c, c) * 2 - 1/2)
  + 1/2) / 2 * alpha`` with ``c = 0.99``: levels {-0.75, -0.25, 0.25, 0.75} alpha, alpha
  initialised to ``max|W|``.
- ``seq_ternary`` (1.58 bits, the reference's ``w_bits=0``): ``round(clamp(W / alpha, -c, c) *
  1.5) / 1.5 * alpha``: levels {-2/3, 0, 2/3} alpha, alpha initialised to ``max|W|``. Stored
  like ``ternary``: ``bits=2`` in specs, five trits per byte.

Gradients (reference backward, ``layerwise=False``): with ``x = W / alpha``,
``dL/dW = dL/dWq`` where ``x`` lies inside the clip range ([-1, 1] sign, [Qn, Qp] LSQ,
[-c, c] SEQ) and 0 outside; ``dL/dalpha = sum over the row of dL/dWq * g(x) * s`` with
``s = 1 / sqrt(numel(W) * Qp)`` (``Qp = 1`` for sign and both SEQ grids) and ``g(x)`` =
``sign(x)`` (1 bit); ``Qn`` / ``Qp`` below / above the range and ``round(x) - x`` inside (LSQ);
``-+(n - shift) / n`` outside and ``level(x) - x`` inside (SEQ; ``+-1`` ternary, ``+-0.75`` at
2 bits).

Where this differs from the reference: alpha is rounded to fp16 in the forward (straight
through), so training sees exactly the weights storage holds; ``sign(0) = +1`` (a 1-bit code
cannot hold 0; the reference's ``torch.sign`` gives 0 for an exactly-zero weight); levels
divide by ``n`` as a tensor (``div_exact``) so CPU and CUDA agree to the last bit. Rounding is
``torch.round`` (half to even) as in the reference, not the harness's half-away rule.

Stored tensors: codes (``level index + offset``, unsigned) packed at ``bits`` per weight (trits
for ternary), and alpha itself as the fp16 ``scales`` ``[out, n_groups]``; ``dequantize``
repeats the forward's float operations on the codes, so a packed weight equals the training
forward's bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from harness.errors import HarnessError
from harness.quant.formats import Format, register_format
from harness.quant.grid import div_exact
from harness.quant.packed import PackedTensor
from harness.quant.primitives import QParams, grouped
from harness.quant.ternary import TritPacking

#: the reference's floor on alpha (``torch.where(alpha > eps, alpha, eps)``)
ALPHA_EPS = 1e-5
#: the reference's SEQ clip, ``clip_val = 1 - 1e-2``
SEQ_CLIP = 1 - 1e-2


@dataclass(frozen=True)
class Grid:
    """One ParetoQ grid in units of alpha.

    Attributes:
        kind: ``sign`` (1 bit), ``lsq`` (integer steps) or ``seq`` (stretched elastic).
        lo, hi: the range of ``x = W / alpha`` whose weights get a gradient.
        out_lo, out_hi: alpha's gradient factor below ``lo`` / above ``hi`` (LSQ, SEQ).
        n_levels, shift: SEQ's ``n`` and half shift (level ``(r + shift) / n``).
        offset: added to the level index ``r`` to make an unsigned code.
        grad_qp: the ``Qp`` of the gradient scale ``1 / sqrt(numel * Qp)``.
    """

    kind: Literal["sign", "lsq", "seq"]
    lo: float
    hi: float
    out_lo: float = 0.0
    out_hi: float = 0.0
    n_levels: float = 1.0
    shift: float = 0.0
    offset: int = 0
    grad_qp: int = 1

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Level index ``r`` (integer-valued float) of ``x = W / alpha``."""
        if self.kind == "sign":
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)  # sign(0) = +1, storable
        if self.kind == "lsq":
            return torch.round(x).clamp(self.lo, self.hi)
        return torch.round(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * self.n_levels - self.shift)

    def level(self, r: torch.Tensor) -> torch.Tensor:
        """Level in units of alpha of index ``r``: the one formula forward and dequantize use."""
        if self.kind != "seq":
            return r
        return div_exact(r + self.shift, self.n_levels)

    def codes(self, r: torch.Tensor) -> torch.Tensor:
        if self.kind == "sign":
            return (r < 0).to(torch.uint8)  # 1 = negative, as the binary format
        return (r + self.offset).to(torch.uint8)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.float()
        return 1 - 2 * c if self.kind == "sign" else c - self.offset

    def alpha_factor(self, x: torch.Tensor) -> torch.Tensor:
        """``d(level(x) * alpha) / d alpha`` as the reference's backward writes it."""
        if self.kind == "sign":
            return self.index(x)
        small, big = x < self.lo, x > self.hi
        if self.kind == "lsq":
            inside = torch.round(x) - x
        else:
            inside = self.level(self.index(x)) - x
        return torch.where(small, self.out_lo, torch.where(big, self.out_hi, inside))


def sign_grid() -> Grid:
    return Grid("sign", -1.0, 1.0)


def lsq_grid(bits: int) -> Grid:
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return Grid("lsq", qn, qp, out_lo=qn, out_hi=qp, offset=-qn, grad_qp=qp)


def seq_grid(ternary: bool) -> Grid:
    n, shift = (1.5, 0.0) if ternary else (2.0, 0.5)
    qp = (n - shift) / n  # the reference's Qp/Qn reassigned inside StretchedElasticQuant
    offset = -int(round(-SEQ_CLIP * n - shift))  # 1 ternary, 2 at 2 bits
    return Grid("seq", -SEQ_CLIP, SEQ_CLIP, out_lo=-qp, out_hi=qp, n_levels=n, shift=shift,
                offset=offset)


def stored_alpha(alpha: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """The reference's floor ``alpha > eps``, then rounding to the stored dtype (float32)."""
    a = alpha.detach().float()
    a = torch.where(a > ALPHA_EPS, a, torch.full_like(a, ALPHA_EPS))
    return a if scale_dtype is None else a.to(scale_dtype).float()


class _ParetoQuant(torch.autograd.Function):
    """``level(W / alpha) * alpha`` per group with the reference's straight-through backward
    (the module docstring). ``alpha``'s gradient is returned for the alpha given, as the
    reference does (its floor and the fp16 rounding pass it straight through)."""

    @staticmethod
    def forward(ctx, w, alpha, grid: Grid, group_size: int, scale_dtype, out_dtype):
        xg = grouped(w.detach().float(), group_size)
        a = stored_alpha(alpha, scale_dtype).reshape(xg.shape[0], xg.shape[1], 1)
        ctx.save_for_backward(w, a)
        ctx.grid, ctx.group_size, ctx.alpha_shape = grid, group_size, alpha.shape
        out = grid.level(grid.index(xg / a)) * a
        return out.reshape(w.shape).to(out_dtype or w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, a = ctx.saved_tensors
        grid: Grid = ctx.grid
        x = grouped(w.float(), ctx.group_size) / a
        g = grouped(grad.float(), ctx.group_size)
        grad_w = grad_alpha = None
        if ctx.needs_input_grad[0]:
            inside = (x >= grid.lo) & (x <= grid.hi)
            grad_w = (g * inside).reshape(w.shape).to(w.dtype)
        if ctx.needs_input_grad[1]:
            scale = 1.0 / math.sqrt(w.numel() * grid.grad_qp)
            grad_alpha = (grid.alpha_factor(x) * g * scale).sum(-1).reshape(ctx.alpha_shape)
        return grad_w, grad_alpha, None, None, None, None


@dataclass(frozen=True, kw_only=True)
class ParetoQFormat(Format):
    """What the three ParetoQ formats share: a grid per ``bits``, scales = alpha (fp16,
    ``[out, n_groups]``), no zero points, no fused kernel. Symmetric by construction.

    Beside the harness's format protocol (where alpha is the initial scale computed from
    ``w``, so ``--methods rtn --set fmt=seq`` works too) each has the ``*_scaled`` forms taking
    a learned alpha, which ``harness_paretoq.linear.ParetoQLinear`` trains and packs.
    """

    #: the bits each format takes, what that means and the fix for other widths (one line)
    allowed_bits: ClassVar[tuple[int, ...]] = ()
    bits_rule: ClassVar[str] = ""
    bits_fix: ClassVar[str] = ""

    @classmethod
    def check(cls, bits, symmetric, params):
        if isinstance(bits, bool) or bits not in cls.allowed_bits:
            raise HarnessError(f"{cls.name} {cls.bits_rule}, got bits={bits}; {cls.bits_fix}")
        if symmetric:
            raise HarnessError(f"{cls.name} is symmetric by construction (no zero point); drop "
                               f"symmetric")
        super().check(bits, symmetric, params)

    @property
    def grid(self) -> Grid:
        raise NotImplementedError

    def init_scales(self, w: torch.Tensor) -> torch.Tensor:
        """The reference's initial alpha (``train.py``) per group, ``[out, n_groups]`` float32:
        ``mean|W|`` at 1 bit, ``max|W|`` for SEQ, ``max|W| / Qp`` for LSQ at 3-4 bits."""
        mag = grouped(w.float(), self.group_size).abs()
        if self.grid.kind == "sign":
            return mag.mean(-1)
        return mag.amax(-1) / self.grid.grad_qp

    # --- with a learned alpha ------------------------------------------------------------
    def fake_quantize_scaled(self, w: torch.Tensor, alpha: torch.Tensor, *,
                             scale_dtype: torch.dtype | None = torch.float16,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``level(W / alpha) * alpha`` with the reference's gradients for ``w`` and ``alpha``.

        Args:
            w: ``[out, in]`` latent weight.
            alpha: ``[out, n_groups]`` scales (the learnable parameter).
            scale_dtype: alpha is rounded to it (straight through): fp16 = what is stored.
            out_dtype: dtype of the result (default ``w``'s).
        """
        return _ParetoQuant.apply(w, alpha, self.grid, self.group_size, scale_dtype, out_dtype)

    @torch.no_grad()
    def quantize_scaled(self, w: torch.Tensor, alpha: torch.Tensor,
                        scale_dtype: torch.dtype = torch.float16) -> QParams:
        """Codes + alpha with ``dequantize(quantize_scaled(w, a)) ==
        fake_quantize_scaled(w, a, scale_dtype=scale_dtype)`` bit for bit."""
        xg = grouped(w.float(), self.group_size)
        a = stored_alpha(alpha, scale_dtype).reshape(xg.shape[0], xg.shape[1])
        codes = self.grid.codes(self.grid.index(xg / a.unsqueeze(-1)))
        return QParams(codes.reshape(w.shape), a.to(scale_dtype), None, self.name, self.bits,
                       self.group_size, False, tuple(w.shape))

    def pack_scaled(self, w: torch.Tensor, alpha: torch.Tensor) -> PackedTensor:
        """Packs ``w`` on the grid of the learned ``alpha`` (fp16 scales)."""
        q = self.quantize_scaled(w.detach(), alpha.detach(), torch.float16)
        return PackedTensor(self.pack_codes(q.codes), q.scales, None, self.name, self.bits,
                            self.group_size, False, tuple(w.shape), format=self)

    # --- the harness's format protocol ---------------------------------------------------
    def quantize(self, w, scale_dtype=torch.float16):
        return self.quantize_scaled(w, self.init_scales(w.detach()), scale_dtype)

    def dequantize(self, q, dtype=torch.float32):
        levels = self.grid.level(self.grid.from_codes(grouped(q.codes, q.group_size)))
        return (levels * q.scales.float().unsqueeze(-1)).reshape(q.shape).to(dtype)

    def fake_quantize(self, w, *, detach_scales=False, scale_dtype=None, fused=True,
                      out_dtype=None):
        # alpha from w each forward (RTN-style use); its gradient reaches w unless detached
        alpha = self.init_scales(w)
        return self.fake_quantize_scaled(w, alpha.detach() if detach_scales else alpha,
                                         scale_dtype=scale_dtype, out_dtype=out_dtype)


@register_format("seq")
@dataclass(frozen=True, kw_only=True)
class SEQFormat(ParetoQFormat):
    """ParetoQ's 2-bit stretched elastic grid: {-0.75, -0.25, 0.25, 0.75} x alpha."""

    fixed_bits: ClassVar[int | None] = 2
    allowed_bits: ClassVar[tuple[int, ...]] = (2,)
    bits_rule: ClassVar[str] = "is ParetoQ's 2-bit grid"
    bits_fix: ClassVar[str] = "use fmt=seq_ternary for 1.58 bits or fmt=lsq for 1, 3 or 4 bits"
    bits: int = 2

    @property
    def grid(self) -> Grid:
        return seq_grid(ternary=False)


@register_format("seq_ternary")
@dataclass(frozen=True, kw_only=True)
class SEQTernaryFormat(TritPacking, ParetoQFormat):
    """ParetoQ's 1.58-bit stretched elastic grid: {-2/3, 0, 2/3} x alpha, five trits per
    byte; ``bits`` is 2 in specs (as ``ternary``)."""

    fixed_bits: ClassVar[int | None] = 2
    allowed_bits: ClassVar[tuple[int, ...]] = (2,)
    bits_rule: ClassVar[str] = "is fixed at 1.58 bits (specs store bits=2)"
    bits_fix: ClassVar[str] = "drop --bits, or use fmt=seq for 2 bits, fmt=lsq for 1, 3 or 4"
    bits: int = 2

    @property
    def grid(self) -> Grid:
        return seq_grid(ternary=True)

    @property
    def nominal_bits(self) -> float:
        return 1.58

    def label(self) -> str:
        return f"seq_ternary g{self.group_size}"


@register_format("lsq")
@dataclass(frozen=True, kw_only=True)
class LSQFormat(ParetoQFormat):
    """ParetoQ's learned-step grids: sign x alpha at 1 bit, integers [-2^(b-1), 2^(b-1) - 1]
    x alpha at 3-4 bits."""

    allowed_bits: ClassVar[tuple[int, ...]] = (1, 3, 4)
    bits_rule: ClassVar[str] = "takes 1, 3 or 4 bits"
    bits_fix: ClassVar[str] = ("use fmt=seq for ParetoQ's 2 bits, fmt=seq_ternary for 1.58; "
                               "ParetoQ has no grid above 4 bits")

    @property
    def grid(self) -> Grid:
        return sign_grid() if self.bits == 1 else lsq_grid(self.bits)
