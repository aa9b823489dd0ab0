"""Packed storage of a quantized weight: packed codes, fp16 scales, packed zero points.

How codes and zero points are packed is the format object's business
(``Format.pack_codes`` / ``pack_zeros``, ``harness.quant.formats``); this is the container,
holding the format that packed it, and its measured size. It imports no format: the formats
build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from harness.quant.primitives import QParams


class Unpacks(Protocol):
    """What a stored weight needs of the format that packed it (a ``harness.quant.formats``
    format object)."""

    def unpack(self, p: PackedTensor) -> QParams: ...

    def dequantize(self, q: QParams, dtype: torch.dtype) -> torch.Tensor: ...


def stored_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the stored tensors, measured (bits/weight comes from this, not a formula)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())

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
    # the object that packed it (read back from a file: harness.quant.formats.packed_from_tensors)
    format: Unpacks = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.tensors())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def qparams(self) -> QParams:
        return self.format.unpack(self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.dequantize(self.qparams(), dtype)

    def meta(self) -> dict:
        return {"fmt": self.fmt, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict,
                     format: Unpacks) -> PackedTensor:
        return cls(tensors["codes"], tensors["scales"], tensors.get("zeros"), meta["fmt"],
                   meta["bits"], meta["group_size"], meta["symmetric"], tuple(meta["shape"]),
                   format=format)

