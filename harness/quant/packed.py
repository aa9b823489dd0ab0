"""Packed storage of a quantized weight: bit-packed codes, fp16 scales, packed zero points."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.quant.bitpack import pack_bits, unpack_bits
from harness.quant.primitives import QParams, dequantize, quantize

_FIELDS = ("codes", "scales", "zeros")


@dataclass
class PackedTensor:
    """A weight as stored. ``nbytes`` is measured from the tensors held, not from a formula."""

    codes: torch.Tensor  # uint8 bitstream
    scales: torch.Tensor  # fp16 [out, n_groups]
    zeros: torch.Tensor | None  # int asym: uint8 bitstream at the code width; nf3: fp16 |min|
    fmt: str
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def qparams(self) -> QParams:
        n = self.shape[0] * self.shape[1]
        codes = unpack_bits(self.codes, self.bits, n).view(self.shape)
        zeros = self.zeros
        if zeros is not None and self.fmt == "int":
            zeros = unpack_bits(zeros, self.bits, self.scales.numel()).view(self.scales.shape)
        return QParams(codes, self.scales, zeros, self.fmt, self.bits, self.group_size,
                       self.symmetric, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qparams(), dtype)

    def meta(self) -> dict:
        return {"fmt": self.fmt, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> PackedTensor:
        return cls(tensors["codes"], tensors["scales"], tensors.get("zeros"), meta["fmt"],
                   meta["bits"], meta["group_size"], meta["symmetric"], tuple(meta["shape"]))


def pack(w: torch.Tensor, fmt: str = "int", bits: int = 3, group_size: int = 128,
         symmetric: bool = False) -> PackedTensor:
    """Quantizes ``w`` and packs it; ``pack(w).dequantize()`` equals
    ``fake_quantize(w, ..., scale_dtype=torch.float16)`` bit for bit."""
    q = quantize(w.detach(), fmt, bits, group_size, symmetric, scale_dtype=torch.float16)
    zeros = q.zeros
    if zeros is not None and fmt == "int":
        zeros = pack_bits(zeros, bits)  # zero points are codes too: stored at the code width
    return PackedTensor(pack_bits(q.codes, bits), q.scales, zeros, fmt, bits, group_size,
                        symmetric, tuple(w.shape))
