"""QuantLinear: one module, two states (torchao-style prepare/convert).

- training state: a latent full-precision ``weight`` Parameter, fake-quantized every forward
  with straight-through rounding; scales/zeros recomputed each time and not detached (unless
  ``detach_scales``), as the reference code does. Scales are rounded to fp16 in the forward, so
  training sees exactly the weights storage will hold.
- packed state: bit-packed codes, fp16 scales, zero points at the code width; the weight is
  dequantized on use. ``pack()`` converts in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.quant.bitpack import packed_nbytes
from harness.quant.formats import QuantFormat
from harness.quant.packed import PackedTensor, pack
from harness.quant.primitives import fake_quantize


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, qformat: QuantFormat,
                 bias: bool = True, detach_scales: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qformat = qformat
        self.detach_scales = detach_scales
        self.packed = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._dequant_cache: torch.Tensor | None = None
        # Set for one forward by harness.quant.batched (all layers quantized in one launch).
        self.batched_weight: torch.Tensor | None = None

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, qformat: QuantFormat,
                    detach_scales: bool = False) -> QuantLinear:
        """Training-form module holding ``linear``'s weight (and bias) as the latent weight."""
        m = cls(linear.in_features, linear.out_features, qformat, linear.bias is not None,
                detach_scales)
        m.weight = nn.Parameter(linear.weight.detach().clone(),
                                requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m.to(linear.weight.device)

    def packed_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "qformat": self.qformat.model_dump()}

    @classmethod
    def from_packed_spec(cls, spec: dict) -> QuantLinear:
        """An empty packed-state module of the right shapes, for ``load_state_dict``."""
        q = QuantFormat(**spec["qformat"])
        m = cls(spec["in_features"], spec["out_features"], q, spec["bias"])
        out_f, in_f = m.out_features, m.in_features
        n_groups = 1 if q.group_size == -1 else in_f // q.group_size
        codes = torch.zeros(packed_nbytes(out_f * in_f, q.bits), dtype=torch.uint8)
        scales = torch.zeros(out_f, n_groups, dtype=torch.float16)
        zeros = None
        if q.fmt == "int" and not q.symmetric:
            zeros = torch.zeros(packed_nbytes(out_f * n_groups, q.bits), dtype=torch.uint8)
        elif q.fmt == "nf3":
            zeros = torch.zeros(out_f, n_groups, dtype=torch.float16)
        m._set_packed(PackedTensor(codes, scales, zeros, q.fmt, q.bits, q.group_size,
                                   q.symmetric, (out_f, in_f)))
        return m

    # --- state change -----------------------------------------------------------------
    def _set_packed(self, p: PackedTensor) -> None:
        del self.weight
        self.packed = True
        for name, t in p.tensors().items():
            self.register_buffer(f"q_{name}", t)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._dequant_cache = None
        self.batched_weight = None

    def packed_tensor(self) -> PackedTensor:
        if not self.packed:
            q = self.qformat
            return pack(self.weight.detach(), q.fmt, q.bits, q.group_size, q.symmetric)
        tensors = {n: getattr(self, f"q_{n}") for n in ("codes", "scales", "zeros")
                   if hasattr(self, f"q_{n}")}
        q = self.qformat
        return PackedTensor.from_tensors(tensors, {"fmt": q.fmt, "bits": q.bits,
                                                   "group_size": q.group_size,
                                                   "symmetric": q.symmetric,
                                                   "shape": [self.out_features, self.in_features]})

    @torch.no_grad()
    def pack(self) -> QuantLinear:
        """Converts to the packed state in place (idempotent)."""
        if not self.packed:
            self._set_packed(self.packed_tensor())
        return self

    def dequantized_weight(self) -> torch.Tensor:
        if not self.packed:
            if self.batched_weight is not None:
                return self.batched_weight
            q = self.qformat
            out_dtype = None
            device = self.weight.device.type
            if torch.is_autocast_enabled(device):
                # The matmul runs in the autocast dtype anyway: write that dtype directly.
                out_dtype = torch.get_autocast_dtype(device)
            return fake_quantize(self.weight, q.fmt, q.bits, q.group_size, q.symmetric,
                                 detach_scales=self.detach_scales, scale_dtype=torch.float16,
                                 out_dtype=out_dtype)
        # Unpacking costs a few ms per layer; keep the result while the buffers are unchanged.
        if self._dequant_cache is None or self._dequant_cache.device != self.q_codes.device:
            self._dequant_cache = self.packed_tensor().dequantize(torch.float32)
        return self._dequant_cache

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (Hugging Face export)."""
        w = self.dequantized_weight().detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data.copy_(w)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.detach())
        return lin.to(w.device)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    # --- accounting -------------------------------------------------------------------
    def packed_nbytes(self) -> int:
        bias = self.bias.numel() * 2 if self.bias is not None else 0  # stored as fp16
        return self.packed_tensor().nbytes + bias

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        bias = self.bias
        # Under autocast F.linear casts its operands itself; casting the weight to x's dtype
        # first would add a copy (and its backward) per layer for nothing.
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        q = self.qformat
        state = "packed" if self.packed else "training"
        return (f"in={self.in_features}, out={self.out_features}, {q.fmt}{q.bits} "
                f"g{q.group_size}{' sym' if q.symmetric else ''}, {state}")
