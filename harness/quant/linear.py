"""Quantized linears in two classes, torchao-style prepare/convert.

- ``QuantLinear`` (training form, "prepare"): a latent full-precision ``weight`` Parameter,
  fake-quantized every forward by its format object with a straight-through gradient; scales
  recomputed each time and not detached (unless ``detach_scales``), as the reference code
  does. Scales are rounded to fp16 in the forward, so training sees exactly the weights
  storage will hold.
- ``PackedLinear`` (storage form, "convert"): only the format's stored buffers (``q_codes``,
  ``q_scales``, ``q_zeros``) and the bias; the weight is dequantized on use and cached.

``QuantLinear.to_packed()`` returns a new ``PackedLinear``; ``QuantLinear.pack()`` converts the
module in place (its class becomes ``PackedLinear``), because callers pack module by module
while the model, hooks and names keep pointing at it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.quant.formats import Format, QuantFormat, fake_quantize
from harness.quant.packed import PackedTensor

# Packed files name the module type; both forms were one class called QuantLinear when the
# format was fixed, so the storage form keeps answering to that name.
SPEC_TYPE = "QuantLinear"


def _spec(m: nn.Module) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "qformat": m.qformat.model_dump()}


class _QuantizedLinear(nn.Module):
    """What both forms share: a linear whose weight comes from ``dequantized_weight()`` (fake
    quantized in training, unpacked in storage), its stored bytes and its description."""

    state = ""

    def packed_nbytes(self) -> int:
        return _packed_nbytes(self, self.packed_tensor())

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return _repr(self, self.state)


class QuantLinear(_QuantizedLinear):
    """Training form: latent weight, fake-quantized each forward."""

    packed = False
    state = "training"

    def __init__(self, in_features: int, out_features: int, qformat: QuantFormat,
                 bias: bool = True, detach_scales: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qformat = qformat
        self.format: Format = qformat.format()
        self.detach_scales = detach_scales
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
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
        return _spec(self)

    @classmethod
    def from_packed_spec(cls, spec: dict) -> PackedLinear:
        """An empty storage-form module of the right shapes, for ``load_state_dict`` (packed
        files name this class; see :data:`SPEC_TYPE`)."""
        return PackedLinear.from_packed_spec(spec)

    # --- conversion -------------------------------------------------------------------
    def packed_tensor(self) -> PackedTensor:
        return self.format.pack(self.weight.detach())

    @torch.no_grad()
    def to_packed(self) -> PackedLinear:
        """A new storage-form module with this layer's quantized weight and bias."""
        m = PackedLinear(self.in_features, self.out_features, self.qformat,
                         self.bias is not None, tensors=self.packed_tensor().tensors())
        if self.bias is not None:
            m.bias.data.copy_(self.bias.detach())
        return m.to(self.weight.device)

    @torch.no_grad()
    def pack(self) -> PackedLinear:
        """Converts this module in place to :class:`PackedLinear` and returns it."""
        p = self.packed_tensor()
        del self.weight
        self.__class__ = PackedLinear
        self._install(p.tensors())
        return self

    # --- forward ----------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        if self.batched_weight is not None:
            return self.batched_weight
        out_dtype = None
        device = self.weight.device.type
        if torch.is_autocast_enabled(device):
            # The matmul runs in the autocast dtype anyway: write that dtype directly.
            out_dtype = torch.get_autocast_dtype(device)
        return fake_quantize(self.weight, self.format, detach_scales=self.detach_scales,
                             scale_dtype=torch.float16, out_dtype=out_dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (Hugging Face export)."""
        return _to_linear(self)



class PackedLinear(_QuantizedLinear):
    """Storage form: the format's packed buffers; the weight is dequantized on use, cached.

    Buffers are named ``q_codes``, ``q_scales`` and (formats with zero points) ``q_zeros``:
    these names are the packed file's keys.
    """

    packed = True
    state = "packed"

    def __init__(self, in_features: int, out_features: int, qformat: QuantFormat,
                 bias: bool = True, tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qformat = qformat
        self.format: Format = qformat.format()
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._install(tensors if tensors is not None
                      else self.format.empty_tensors(out_features, in_features))

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.register_buffer(f"q_{name}", t)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._dequant_cache: torch.Tensor | None = None
        self.batched_weight = None

    @classmethod
    def from_packed_spec(cls, spec: dict) -> PackedLinear:
        """An empty module of the right shapes, for ``load_state_dict``."""
        return cls(spec["in_features"], spec["out_features"], QuantFormat(**spec["qformat"]),
                   spec["bias"])

    def packed_spec(self) -> dict:
        return {"type": SPEC_TYPE, **_spec(self)}

    def packed_tensor(self) -> PackedTensor:
        tensors = {n: getattr(self, f"q_{n}") for n in ("codes", "scales", "zeros")
                   if hasattr(self, f"q_{n}")}
        f = self.format
        return PackedTensor.from_tensors(tensors, {"fmt": f.name, "bits": f.bits,
                                                   "group_size": f.group_size,
                                                   "symmetric": f.symmetric,
                                                   "shape": [self.out_features, self.in_features]},
                                         format=f)

    def pack(self) -> PackedLinear:
        return self  # already packed: idempotent, as pack_all expects

    def dequantized_weight(self) -> torch.Tensor:
        # Unpacking costs a few ms per layer; keep the result while the buffers are unchanged.
        if self._dequant_cache is None or self._dequant_cache.device != self.q_codes.device:
            self._dequant_cache = self.packed_tensor().dequantize(torch.float32)
        return self._dequant_cache

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (Hugging Face export)."""
        return _to_linear(self)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant_cache = None
        return super()._load_from_state_dict(*args, **kwargs)



def pack(m: QuantLinear) -> PackedLinear:
    """The storage form of a training-form layer, as a new module (``m`` is unchanged)."""
    return m.to_packed()


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Under autocast F.linear casts its operands itself; casting the weight to x's dtype
    # first would add a copy (and its backward) per layer for nothing.
    if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        w = w.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, w, bias)


def _to_linear(m: QuantLinear | PackedLinear) -> nn.Linear:
    w = m.dequantized_weight().detach()
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    lin.weight.data.copy_(w)
    if m.bias is not None:
        lin.bias.data.copy_(m.bias.detach())
    return lin.to(w.device)


def _packed_nbytes(m: QuantLinear | PackedLinear, p: PackedTensor) -> int:
    bias = m.bias.numel() * 2 if m.bias is not None else 0  # stored as fp16
    return p.nbytes + bias


def _repr(m: QuantLinear | PackedLinear, state: str) -> str:
    return f"in={m.in_features}, out={m.out_features}, {m.format.label()}, {state}"
