"""QuantLinear: one module, two states (torchao's prepare/convert, llmc's fake/real quant).

- Training state (:meth:`QuantLinear.from_linear`): a latent full-precision ``weight``
  Parameter, fake-quantized on every forward with straight-through rounding. Scales/zeros are
  recomputed from the weight each time and not detached unless ``detach_scales`` (METHODS.md,
  "Shared"). Scales are rounded to fp16 in the forward, so training sees exactly the weights
  that storage will hold.
- Packed state (:meth:`QuantLinear.pack`, :meth:`QuantLinear.empty_packed`): buffers holding
  a :class:`~harness.quant.packed.PackedTensor` (bit-packed codes, fp16 scales, packed zero
  points); the weight Parameter is gone and the forward dequantizes.

Logits are identical in both states (tested with ``torch.equal``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.quant.formats import QuantFormat
from harness.quant.packed import SCALE_DTYPE, TENSOR_FIELDS, PackedTensor, pack
from harness.quant.primitives import fake_quantize

_PREFIX = "q_"  # buffer names: q_codes, q_scales, q_zeros, q_neg_scales
_SCALE_BUFFERS = ("q_scales", "q_neg_scales")


class QuantLinear(nn.Module):
    """A linear layer whose weight is quantized to ``qformat`` (int or nf3).

    Args:
        in_features, out_features: as ``nn.Linear``.
        qformat: the weight format.
        bias: whether the layer has a bias (kept in full precision, counted at fp16).
        detach_scales: training state: stop gradients into scales/zeros.

    Attributes:
        cache_dequantized: packed state: keep the dequantized weight between forwards. On by
            default because unpacking every layer on every forward slows CPU evaluation several
            times over; the memory metrics are measured from the packed buffers, not from the
            process RSS, so the cache does not inflate them. Set False to hold only packed
            bytes (dequantizing on each forward).
    """

    cache_dequantized: bool = True

    def __init__(self, in_features: int, out_features: int, qformat: QuantFormat,
                 bias: bool = True, detach_scales: bool = False) -> None:
        super().__init__()
        if qformat.fmt not in ("int", "nf3"):
            raise HarnessError(f"QuantLinear handles int and nf3 formats, not {qformat.fmt!r}; "
                               f"use harness.quant.onebit.OneBitLinear for binary")
        if not qformat.divisible(in_features):
            from harness.quant.formats import valid_group_sizes

            raise HarnessError(f"group size {qformat.group_size} does not divide in_features="
                               f"{in_features}; use one of {valid_group_sizes([in_features])}")
        self.in_features, self.out_features = in_features, out_features
        self.qformat = qformat
        self.detach_scales = detach_scales
        self.packed = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._cache: torch.Tensor | None = None

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, qformat: QuantFormat,
                    detach_scales: bool = False) -> QuantLinear:
        """Training-state module whose latent weight (and bias) are copies of ``linear``'s.

        Raises:
            HarnessError: ``qformat`` is not int/nf3 or its group size does not divide
                ``linear.in_features``.
        """
        m = cls(linear.in_features, linear.out_features, qformat, linear.bias is not None,
                detach_scales)
        w = linear.weight.detach()
        m.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(),
                                  requires_grad=linear.bias.requires_grad)
        return m

    @classmethod
    def empty_packed(cls, in_features: int, out_features: int, qformat: QuantFormat,
                     bias: bool = True) -> QuantLinear:
        """A packed-state module of the right shapes, to ``load_state_dict`` a packed one into."""
        m = cls(in_features, out_features, qformat, bias)
        q = qformat
        m._set_packed(PackedTensor.empty(out_features, in_features, q.fmt, q.bits, q.group_size,
                                         q.symmetric))
        return m

    def packed_spec(self) -> dict[str, Any]:
        """JSON-able description for :meth:`from_packed_spec` (saved as file metadata)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "qformat": self.qformat.model_dump()}

    @classmethod
    def from_packed_spec(cls, spec: dict[str, Any]) -> QuantLinear:
        """:meth:`empty_packed` from :meth:`packed_spec`'s dict (extra keys ignored)."""
        return cls.empty_packed(int(spec["in_features"]), int(spec["out_features"]),
                                QuantFormat(**spec["qformat"]), bool(spec["bias"]))

    # --- state change ------------------------------------------------------------------
    def _set_packed(self, p: PackedTensor) -> None:
        device = self.weight.device
        del self.weight
        self.packed = True
        for name, t in p.tensors().items():
            self.register_buffer(_PREFIX + name, t.to(device))
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._cache = None

    def packed_tensor(self) -> PackedTensor:
        """The packed form: the buffers (packed state) or the latent weight packed now."""
        q = self.qformat
        if not self.packed:
            return pack(self.weight.detach(), q.fmt, q.bits, q.group_size, q.symmetric)
        tensors = {n: getattr(self, _PREFIX + n) for n in TENSOR_FIELDS
                   if hasattr(self, _PREFIX + n)}
        meta = {"fmt": q.fmt, "bits": q.bits, "group_size": q.group_size,
                "symmetric": q.symmetric, "shape": [self.out_features, self.in_features]}
        return PackedTensor.from_state_dict(tensors, meta)

    @torch.no_grad()
    def pack(self) -> QuantLinear:
        """Converts to the packed state in place (idempotent); returns ``self``."""
        if not self.packed:
            self._set_packed(self.packed_tensor())
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight: fake-quantized latent (training) or dequantized buffers."""
        q = self.qformat
        if not self.packed:
            return fake_quantize(self.weight, q.fmt, q.bits, q.group_size, q.symmetric,
                                 detach_scales=self.detach_scales, scale_dtype=SCALE_DTYPE)
        if self._cache is not None:
            return self._cache
        w = self.packed_tensor().dequantize(torch.float32)
        if self.cache_dequantized:
            self._cache = w
        return w

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (Hugging Face export).

        Args:
            dtype: weight dtype; default the latent weight's (training) or float32 (packed).
        """
        with torch.no_grad():
            w = self.dequantized_weight().detach()
            dtype = dtype or w.dtype
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=w.device, dtype=dtype)
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _apply(self, fn, recurse=True):
        # model.to(dtype)/.half() would convert the fp16 scales and change the measured bytes
        # (or round them through bf16): keep them fp16 and only follow the device move.
        saved = {n: self._buffers.pop(n) for n in _SCALE_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self._buffers[_PREFIX + "codes"].device if saved else None
            for n, t in saved.items():
                self._buffers[n] = t.to(device)
        self._cache = None
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # --- accounting --------------------------------------------------------------------
    def packed_nbytes(self) -> int:
        """Bytes of the packed form (held, or what packing would hold) plus the bias at fp16."""
        if self.packed:
            nbytes = self.packed_tensor().nbytes
        else:  # measure empty storage of the same construction instead of quantizing now
            q = self.qformat
            nbytes = PackedTensor.empty(self.out_features, self.in_features, q.fmt, q.bits,
                                        q.group_size, q.symmetric, device="meta").nbytes
        return nbytes + (self.bias.numel() * 2 if self.bias is not None else 0)

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        bias = self.bias
        if w.dtype != x.dtype:  # bf16 activations: cast the (fp32) weight, as nn.Linear would fail
            w = w.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        state = "packed" if self.packed else "training"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.qformat.name}, {state}")
