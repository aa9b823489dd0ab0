"""OneBit: 1-bit sign matrices with two fp16 value vectors (Xu et al. 2024).

A linear layer ``Y = X W^T`` becomes (paper section 3.2; reference ``BitLinear`` in
xuyuzhuang11/OneBit ``transformers/src/transformers/models/bitnet.py``)

    Y = LayerNorm_no_affine(((X * g) @ sign(W)^T) * h) + bias

with ``g`` over inputs, ``h`` over outputs and the LayerNorm over the output features
(``nn.LayerNorm(out_features, elementwise_affine=False)``, eps 1e-5), after ``h`` and before the
bias. SVID initialisation (section 3.3, reference ``scripts/build_start_ckpt.py``): a rank-1
non-negative factorisation ``|W| ~ a b^T``, ``h = a``, ``g = b``, latent weight
``sign(W) * 0.01``.

Two forms, as ``QuantLinear``: the training form (latent weight, ``g``, ``h`` trainable; the sign
through a straight-through estimator) and the packed form (sign bits + fp16 vectors), which is
what is stored and evaluated. The training form rounds ``g``, ``h`` and the bias through fp16
in its forward (straight-through), so both forms give bit-identical outputs.

Differences from the reference code: the layer computes ``x @ ((h g^T) * sign(W))^T`` (the
same products, grouped on the weight: :func:`effective_weight`), so ``g`` and ``h`` cost
weight-sized work instead of two passes over the activations and their backward. It pays
with many tokens per step: a OneBit training step of SmolLM2 on the CPU takes 0.78x the paper
order's time at 4x256 tokens, 0.99x at 2x256, 1.05x at 1x64 (``bench/onebit_step.py``); on
an H200 at 8x1024 1.10x, with 5.2 GB less memory, the step there being bound by the host's
dispatches, which :func:`effective_weights` (all layers in one node) cuts;
``sign(0) = +1`` here (``torch.sign`` gives 0, which a 1-bit format cannot store); NMF by
multiplicative updates from a deterministic start instead of
scikit-learn's ``NMF(init='random', random_state=0)`` coordinate descent (for rank 1 both reach
the top singular pair of ``|W|``, up to how the scale is split between ``a`` and ``b``; the
layer is invariant to that split because of the LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.quant.formats import Format, register_format
from harness.quant.primitives import QParams

LATENT_INIT = 0.01  # reference: weight = sign(W) * 0.01 after SVID
LN_EPS = 1e-5  # nn.LayerNorm's default, as the reference BitLinear


def _signs_many(ws: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """+1 where ``w >= 0`` else -1 (-0.0 included, as the packed codes), as ``dtype``, for every
    tensor in ``ws`` in three multi-tensor ops: ``sign(sign(w) + 0.5)`` maps -1, 0 (either
    sign) and +1 to -1, +1, +1."""
    out = torch._foreach_sign(ws)
    torch._foreach_add_(out, 0.5)
    torch._foreach_sign_(out)
    return out if all(t.dtype == dtype for t in out) else [t.to(dtype) for t in out]


def _sign_grad_scales(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """``1.001 - tanh(w)^2`` for every tensor in ``ws``: the reference ``SignSTEFunc``'s
    surrogate for sign's derivative, by ``addcmul`` as the reference rounds it."""
    t = torch._foreach_tanh(ws)
    out = torch._foreach_mul(t, 0.0)
    torch._foreach_add_(out, 1.001)
    torch._foreach_addcmul_(out, t, t, value=-1)
    return out


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; backward ``grad * (1.001 - tanh(w)^2)`` (reference ``SignSTEFunc``)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return _signs_many([w], w.dtype)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * _sign_grad_scales([w])[0]


def sign_ste(w: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``w >= 0`` else ``-1``, with OneBit's tanh-shaped straight-through gradient.

    Args:
        w: latent weights.

    Returns:
        A tensor of +-1 shaped and typed like ``w``; backward multiplies the incoming gradient
        by ``1.001 - tanh(w)^2`` (a smooth surrogate of sign's derivative that never vanishes).
    """
    return _SignSTE.apply(w)


def _fp16_ste(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to fp16 values (kept in ``t``'s dtype), gradient passed unchanged."""
    return t + (t.detach().to(torch.float16).to(t.dtype) - t.detach())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the effective weight: x's, at least fp32 (both forms use it: equal outputs)."""
    return torch.promote_types(x.dtype, torch.float32)


class _EffectiveWeights(torch.autograd.Function):
    """``W_eff_i = (h16_i g16_i^T) * sign(w_i)`` for many layers in one autograd node.

    ``g16``, ``h16``: ``g``, ``h`` rounded to fp16 (the stored values) with the gradient passed
    straight through; ``sign`` with :func:`sign_ste`'s gradient. Backward, from ``G = dL/dW_eff``:
    ``dL/dw = G * h16 g16^T * (1.001 - tanh(w)^2)``, ``dL/dh = (G * sign) g16``,
    ``dL/dg = (G * sign)^T h16``: weight-sized work and two matrix-vector products, where the
    op-by-op graph of the paper's formula does its elementwise work on activations. The
    elementwise work runs as multi-tensor (``torch._foreach_*``) ops over all the layers given
    (harness.quant.batched passes chunks of a model's layers), a few dozen dispatches per call
    instead of about twenty per layer; a single layer takes the same code with lists of one,
    so both give the same bits.

    ``out_dtype``: the outputs' dtype (the autocast dtype when the caller knows the weights
    will be cast to it anyway); incoming gradients of any dtype promote to ``dtype`` exactly.
    """

    @staticmethod
    def forward(ctx, dtype: torch.dtype, out_dtype: torch.dtype | None, n: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ws, gs, hs = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        g16 = torch.cat([g.detach() for g in gs]).to(torch.float16).to(dtype)
        h16 = torch.cat([h.detach() for h in hs]).to(torch.float16).to(dtype)
        ctx.sizes = ([g.numel() for g in gs], [h.numel() for h in hs])
        ctx.dtypes = (dtype, [w.dtype for w in ws], [g.dtype for g in gs], [h.dtype for h in hs])
        ctx.save_for_backward(g16, h16, *ws)
        # (sign * h) * g in place: multiplying by +-1 is exact, so this is (h g^T) * sign bit
        # for bit with one weight-sized temporary instead of three
        out = _signs_many(ws, dtype)
        cols, rows = _factor_views(g16, h16, ctx.sizes)
        torch._foreach_mul_(out, cols)
        torch._foreach_mul_(out, rows)
        if out_dtype is not None and out_dtype != dtype:
            out = [t.to(out_dtype) for t in out]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        g16, h16, *ws = ctx.saved_tensors
        dtype, w_dtypes, g_dtypes, h_dtypes = ctx.dtypes
        n = len(ws)
        need_w, need_g, need_h = (any(ctx.needs_input_grad[3 + k * n : 3 + (k + 1) * n])
                                  for k in range(3))
        d_w = d_g = d_h = [None] * n
        # In-place where possible: at most two weight-sized temporaries live at once.
        if need_g or need_h:
            signed = _signs_many(ws, dtype)
            torch._foreach_mul_(signed, list(grads))  # promotes: G's values, exactly
            gv, hv = g16.split(ctx.sizes[0]), h16.split(ctx.sizes[1])
            if need_h:
                d_h = [s.mv(g).to(t) for s, g, t in zip(signed, gv, h_dtypes, strict=True)]
            if need_g:
                d_g = [(h @ s).to(t) for s, h, t in zip(signed, hv, g_dtypes, strict=True)]
            del signed
        if need_w:
            d_w = _sign_grad_scales(ws)
            if any(d.dtype != dtype for d in d_w):
                d_w = [d.to(dtype) for d in d_w]
            torch._foreach_mul_(d_w, list(grads))
            torch._foreach_mul_(d_w, _outer_factors(g16, h16, ctx.sizes))
            d_w = [d if d.dtype == t else d.to(t) for d, t in zip(d_w, w_dtypes, strict=True)]
        return (None, None, None, *d_w, *d_g, *d_h)


def _factor_views(g16: torch.Tensor, h16: torch.Tensor, sizes) -> tuple[list, list]:
    """Each layer's ``h16_i`` as an ``[out, 1]`` column and ``g16_i`` as a ``[1, in]`` row: views
    of the concatenated vectors that broadcast to the layer's weight."""
    return list(h16.unsqueeze(1).split(sizes[1])), list(g16.unsqueeze(0).split(sizes[0], dim=1))


def _outer_factors(g16: torch.Tensor, h16: torch.Tensor, sizes) -> list[torch.Tensor]:
    """``h16_i g16_i^T`` for every layer."""
    return torch._foreach_mul(*_factor_views(g16, h16, sizes))


def effective_weights(ws: list[torch.Tensor], gs: list[torch.Tensor], hs: list[torch.Tensor],
                      dtype: torch.dtype = torch.float32,
                      out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """:func:`effective_weight` of many layers at once (one autograd node, multi-tensor ops).

    Temporaries are weight-sized for all of ``ws`` together (a few fp32 copies in the
    backward): callers with large models pass the layers in chunks (harness.quant.batched).

    Args:
        ws, gs, hs: each layer's latent weight ``[out, in]``, ``g`` ``[in]`` and ``h`` ``[out]``.
        dtype: dtype of the arithmetic.
        out_dtype: dtype of the results (``dtype`` if None).

    Returns:
        One ``[out, in]`` tensor per layer, equal bit for bit to :func:`effective_weight`'s
        (cast to ``out_dtype``), with the same gradients.
    """
    if not ws:
        return []
    return list(_EffectiveWeights.apply(dtype, out_dtype, len(ws), *ws, *gs, *hs))


def effective_weight(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(h g^T) * sign(w)`` with ``g``, ``h`` rounded to fp16, differentiable (see
    :class:`_EffectiveWeights`): ``x @ W_eff^T`` equals ``((x * g) @ sign(w)^T) * h``.

    Args:
        w: latent weights ``[out, in]``.
        g: input-side vector ``[in]``.
        h: output-side vector ``[out]``.
        dtype: dtype of the result and of the arithmetic.

    Returns:
        ``[out, in]`` tensor of ``dtype``.
    """
    return effective_weights([w], [g], [h], dtype)[0]


def sign_codes(w: torch.Tensor) -> torch.Tensor:
    """1-bit codes, 1 for a negative weight (reference ``BitLinearInf``: bit 1 -> -1)."""
    return (w < 0).to(torch.uint8).flatten()


@register_format("binary")
@dataclass(frozen=True, kw_only=True)
class BinaryFormat(Format):
    """OneBit's sign matrix: one bit per weight (1 = negative, sign(0) = +1). Its scales are
    the layer's two fp16 vectors, not per-group parameters, so ``OneBitLinear`` owns the
    forward and its storage; this object owns the codes and their packing."""

    fixed_bits: ClassVar[int | None] = 1

    @classmethod
    def check(cls, bits, symmetric, params):
        if bits != 1:
            raise HarnessError("binary is a 1-bit format; set bits=1")
        super().check(bits, symmetric, params)

    def quantize(self, w, scale_dtype=torch.float16):
        codes = sign_codes(w.detach()).view(w.shape)
        return QParams(codes, torch.ones(w.shape[0], 1, dtype=scale_dtype, device=w.device),
                       None, self.name, 1, -1, False, tuple(w.shape))

    def dequantize(self, q, dtype=torch.float32):
        return (1 - 2 * q.codes.float()).mul(q.scales.float()).to(dtype)

    def fake_quantize(self, w, *, detach_scales=False, scale_dtype=None, fused=True,
                      out_dtype=None):
        return sign_ste(w).to(out_dtype or w.dtype)


#: The format of every OneBit layer's sign matrix: its codes, their packing and their bytes.
SIGNS = BinaryFormat(bits=1, group_size=-1)


@torch.no_grad()
def svid(w: torch.Tensor, method: Literal["nmf", "svd"] = "nmf", iters: int = 100
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-value-independent decomposition: rank-1 non-negative factors of ``|W|``.

    ``nmf``: Lee-Seung multiplicative updates ``a <- a * (|W| b) / (a b^T b)`` and the same for
    ``b``, started from the row means and column means of ``|W|`` (deterministic). For rank 1 an
    update is the exact least-squares step, i.e. power iteration, so it converges to the top
    singular pair of ``|W|`` (non-negative by Perron-Frobenius). ``svd``: that pair from a full
    LAPACK SVD of ``|W|`` (exact, ``O(out * in * min(out, in))``), made non-negative. Either way
    the scale is split evenly (``||a|| = ||b||``).

    Args:
        w: ``[out, in]`` weight.
        method: ``"nmf"`` (paper default) or ``"svd"``.
        iters: multiplicative-update rounds for ``nmf``.

    Returns:
        ``(a, b)``: ``a`` ``[out]`` (becomes ``h``), ``b`` ``[in]`` (becomes ``g``), fp32,
        non-negative, with ``|W| ~ a b^T``.

    Raises:
        HarnessError: unknown method.
    """
    absw = w.detach().float().abs()
    if method == "svd":
        u, s, vh = torch.linalg.svd(absw, full_matrices=False)
        a, b = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
        if a.sum() < 0:  # singular vectors come with an arbitrary sign
            a, b = -a, -b
        return a.clamp_min(0), b.clamp_min(0)
    if method != "nmf":
        raise HarnessError(f"unknown SVID method {method!r}; use 'nmf' or 'svd'")
    eps = torch.finfo(torch.float32).tiny
    mean = absw.mean().clamp_min(eps)
    a, b = absw.mean(1), absw.mean(0) / mean
    for _ in range(iters):
        a = a * (absw @ b) / (a * (b @ b) + eps)
        b = b * (absw.T @ a) / (b * (a @ a) + eps)
    ratio = (a.norm() / b.norm().clamp_min(eps)).sqrt().clamp_min(eps)
    return a / ratio, b * ratio


@torch.no_grad()
def rank1_svd_error(w: torch.Tensor) -> torch.Tensor:
    """Frobenius error of the best rank-1 approximation of ``W`` itself (no sign split).

    ``||W - s1 u1 v1^T||_F = sqrt(sum_{i >= 2} s_i^2)`` (Eckart-Young), the baseline of OneBit's
    proposition that factorising ``|W|`` and keeping ``sign(W)`` loses less.

    Args:
        w: ``[out, in]`` weight.

    Returns:
        Scalar fp32 tensor.
    """
    s = torch.linalg.svdvals(w.detach().float())
    return s[1:].pow(2).sum().sqrt()


@torch.no_grad()
def svid_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||W - sign(W) * (a b^T)||_F``, the SVID reconstruction error (sign(0) = +1).

    Args:
        w: ``[out, in]`` weight.
        a: ``[out]`` output-side factor (``h``).
        b: ``[in]`` input-side factor (``g``).

    Returns:
        Scalar fp32 tensor.
    """
    wf = w.detach().float()
    sign = torch.where(wf >= 0, 1.0, -1.0)
    return (wf - sign * torch.outer(a.float(), b.float())).norm()


class OneBitLinear(nn.Module):
    """OneBit linear layer, training form or packed form (see the module docstring).

    Training form: parameters ``weight`` (latent ``[out, in]``), ``g`` ``[in]``, ``h`` ``[out]``
    and optional ``bias``. Packed form (after :meth:`pack`): buffers ``sign_bits`` (uint8, 1 bit
    per weight, 1 = negative), ``g``, ``h`` and ``bias`` in fp16; these stay fp16 when the model
    is cast to another dtype, since they are the stored format.

    Args:
        in_features: input features.
        out_features: output features.
        bias: whether the layer has a bias.
        device: where the tensors live.
        dtype: dtype of the training-form parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.is_packed = False
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.full((out_features, in_features), LATENT_INIT, **kw))
        self.g = nn.Parameter(torch.ones(in_features, **kw))
        self.h = nn.Parameter(torch.ones(out_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        # Set for one forward by harness.quant.batched (all layers' weights in one node).
        self.batched_weight: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, init: Literal["nmf", "svd"] = "nmf",
                    iters: int = 100) -> OneBitLinear:
        """Training-form layer initialised from ``linear`` by SVID.

        Args:
            linear: the full-precision layer (not modified).
            init: SVID method, see :func:`svid`.
            iters: NMF rounds.

        Returns:
            A new module: ``h = a``, ``g = b``, ``weight = sign(W) * 0.01``, bias copied; all
            trainable, on ``linear``'s device and dtype.
        """
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=w.device, dtype=w.dtype)
        a, b = svid(w, method=init, iters=iters)
        module.h.copy_(a)
        module.g.copy_(b)
        module.weight.copy_(torch.where(w >= 0, LATENT_INIT, -LATENT_INIT))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    @classmethod
    def empty_packed(cls, in_features: int, out_features: int, bias: bool = False, *,
                     device: torch.device | str | None = None) -> OneBitLinear:
        """A packed-form layer with zeroed buffers, to ``load_state_dict`` a packed state into."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = in_features, out_features
        module.is_packed = True
        module.batched_weight = None
        n_bytes = SIGNS.codes_nbytes(in_features * out_features)  # the packer's own size
        half = {"dtype": torch.float16, "device": device}
        module.register_buffer("sign_bits", torch.zeros(n_bytes, dtype=torch.uint8, device=device))
        module.register_buffer("g", torch.zeros(in_features, **half))
        module.register_buffer("h", torch.zeros(out_features, **half))
        module.register_buffer("bias", torch.zeros(out_features, **half) if bias else None)
        return module

    def packed_spec(self) -> dict[str, Any]:
        """JSON-able shape description, enough for :meth:`from_packed_spec`."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_packed_spec(cls, spec: dict[str, Any]) -> OneBitLinear:
        """An empty packed layer from :meth:`packed_spec`'s dict (extra keys ignored)."""
        return cls.empty_packed(int(spec["in_features"]), int(spec["out_features"]),
                                bool(spec.get("bias", False)))

    # ------------------------------------------------------------------ packing

    @torch.no_grad()
    def packed_state(self) -> dict[str, torch.Tensor]:
        """The packed tensors of this layer (computed from the training form if needed)."""
        if self.is_packed:
            names = ["sign_bits", "g", "h"] + (["bias"] if self.bias is not None else [])
            return {n: getattr(self, n) for n in names}
        state = {"sign_bits": SIGNS.pack_codes(sign_codes(self.weight.detach())),
                 "g": self.g.detach().to(torch.float16), "h": self.h.detach().to(torch.float16)}
        if self.bias is not None:
            state["bias"] = self.bias.detach().to(torch.float16)
        return state

    @torch.no_grad()
    def pack(self) -> OneBitLinear:
        """Converts this module in place to the packed form and returns it (idempotent)."""
        if self.is_packed:
            return self
        state = self.packed_state()
        for name in ("weight", "g", "h", "bias"):
            delattr(self, name)
        for name, tensor in state.items():
            self.register_buffer(name, tensor.clone())
        if "bias" not in state:
            self.register_buffer("bias", None)
        self.is_packed = True
        self.batched_weight = None
        return self

    def packed_nbytes(self) -> int:
        """Bytes of the packed form, measured from its tensors (packing on the fly if needed)."""
        return sum(t.numel() * t.element_size() for t in self.packed_state().values())

    @property
    def num_weights(self) -> int:
        """Weights this layer stands for (``out * in``), the denominator of bits per weight."""
        return self.in_features * self.out_features

    def _apply(self, fn, recurse: bool = True):
        # Keep the stored fp16 vectors fp16 under model.to(dtype): only move their device.
        if not self.is_packed:
            return super()._apply(fn, recurse)
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            self._buffers[name] = buf.to(self._buffers[name].device)
        return self

    # ------------------------------------------------------------------ forward

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight ``(h g^T) * sign(W)``, in ``dtype``; equal in both forms."""
        if not self.is_packed:
            return effective_weight(self.weight, self.g, self.h, dtype)
        return torch.outer(self.h.to(dtype), self.g.to(dtype)).mul_(self._packed_signs(dtype))

    def _batched_or_own_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight ``forward`` multiplies by: the one harness.quant.batched computed for all
        layers this pass where it has the value this layer would compute (fp32 arithmetic,
        then cast to what the matmul uses), else this layer's own."""
        w = self.batched_weight
        if w is not None and _compute_dtype(x) == torch.float32:
            if torch.is_autocast_enabled(x.device.type):
                if x.dtype in (torch.float32, w.dtype):  # autocast casts both to w.dtype
                    return w
            elif w.dtype == torch.float32:
                return w.to(x.dtype)
        return self._weight(_compute_dtype(x)).to(x.dtype)

    def _packed_signs(self, dtype: torch.dtype) -> torch.Tensor:
        codes = SIGNS.unpack_codes(self.sign_bits, self.num_weights)
        return (1 - 2 * codes.to(torch.int8)).to(dtype).view(self.out_features, self.in_features)

    def _bias(self) -> torch.Tensor | None:
        if self.bias is None or self.is_packed:
            return self.bias
        return _fp16_ste(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(x @ ((h g^T) * sign(W))^T) + bias``, in ``x``'s dtype.

        The same value as the paper's ``LayerNorm(((x * g) @ sign(W)^T) * h) + bias``
        (:meth:`reference_forward`) with ``g`` and ``h`` folded into the weight: their
        elementwise work is done on the ``[out, in]`` weight instead of the ``[tokens, in]``
        input and ``[tokens, out]`` output, and no activation-sized product is kept for the
        backward. Rounding differs from the reference order at the last bits.
        """
        y = F.linear(x, self._batched_or_own_weight(x))
        y = F.layer_norm(y, (self.out_features,), eps=LN_EPS)
        bias = self._bias()
        return y + bias.to(x.dtype) if bias is not None else y

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formula op by op (reference ``BitLinear``): what :meth:`forward` is tested
        and benchmarked against."""
        if self.is_packed:
            g, h = self.g, self.h
            signs = self._packed_signs(x.dtype)
        else:
            g, h = _fp16_ste(self.g), _fp16_ste(self.h)
            signs = sign_ste(self.weight).to(x.dtype)
        y = F.linear(x * g.to(x.dtype), signs) * h.to(x.dtype)
        y = F.layer_norm(y, (self.out_features,), eps=LN_EPS)
        bias = self._bias()
        return y + bias.to(x.dtype) if bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self.is_packed}")
