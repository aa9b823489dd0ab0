"""Packed storage of a quantized weight: bit-packed codes, fp16 scales, packed zero points.

Layout per format (``n_groups = in // group`` per row, row-major):

- int asymmetric: ``codes`` (bits per weight), ``scales`` fp16 ``[out, n_groups]``,
  ``zeros`` zero points packed at the code width (they are codes too, in [0, 2^b - 1]).
- int symmetric: ``codes`` (offset by 2^(b-1)), ``scales``; no zeros.
- nf3: ``codes`` (3-bit level indices), ``scales`` = fp16 |max| of the positive side and
  ``neg_scales`` = fp16 |min| of the negative side; no zeros.

``nbytes`` sums the bytes of the tensors actually held, so bits per weight is measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from harness.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from harness.quant.primitives import QParams, dequantize, group_view, quantize

#: Tensor fields, in storage order; the state-dict keys are ``prefix + name``.
TENSOR_FIELDS = ("codes", "scales", "zeros", "neg_scales")
SCALE_DTYPE = torch.float16


@dataclass
class PackedTensor:
    """A weight as stored.

    Attributes:
        codes: 1-D uint8 bitstream of the ``[out, in]`` codes (row-major).
        scales: fp16 ``[out, n_groups]``.
        zeros: 1-D uint8 bitstream of the ``[out, n_groups]`` zero points (int asym), or None.
        fmt, bits, group_size, symmetric: the format.
        shape: ``(out, in)`` of the weight.
        neg_scales: nf3 only: fp16 ``[out, n_groups]`` negative-side |min|, else None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: str
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, int]
    neg_scales: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == -1 else self.shape[1] // self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (codes, scales, zeros, nf3 negative scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty tensor fields by name."""
        return {k: getattr(self, k) for k in TENSOR_FIELDS if getattr(self, k) is not None}

    def meta(self) -> dict[str, Any]:
        """JSON-able format fields; with :meth:`tensors` enough to rebuild the object."""
        return {"fmt": self.fmt, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "shape": list(self.shape)}

    def qparams(self) -> QParams:
        """Unpacked codes and parameters (uint8 ``[out, in]`` codes)."""
        out_f, in_f = self.shape
        codes = unpack_bits(self.codes, self.bits, out_f * in_f).view(out_f, in_f)
        zeros = None
        if self.zeros is not None:
            zeros = unpack_bits(self.zeros, self.bits, self.scales.numel()).view(self.scales.shape)
        return QParams(codes, self.scales, zeros, self.fmt, self.bits, self.group_size,
                       self.symmetric, self.shape, self.neg_scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight, equal to ``fake_quantize(w, ..., scale_dtype=torch.float16)``."""
        return dequantize(self.qparams(), dtype)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors keyed ``prefix + field`` (e.g. for safetensors); format fields go in
        :meth:`meta`, which the caller stores as metadata."""
        return {prefix + k: t for k, t in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                        prefix: str = "") -> PackedTensor:
        """Rebuilds from :meth:`state_dict`'s tensors and :meth:`meta`'s fields.

        Raises:
            KeyError: ``state`` lacks ``prefix + "codes"`` or ``prefix + "scales"``.
        """
        return cls(state[prefix + "codes"], state[prefix + "scales"], state.get(prefix + "zeros"),
                   str(meta["fmt"]), int(meta["bits"]), int(meta["group_size"]),
                   bool(meta["symmetric"]), (int(meta["shape"][0]), int(meta["shape"][1])),
                   state.get(prefix + "neg_scales"))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                     ) -> PackedTensor:
        """Same as :meth:`from_state_dict` with no prefix."""
        return cls.from_state_dict(tensors, meta)

    @classmethod
    def empty(cls, out_features: int, in_features: int, fmt: str, bits: int, group_size: int,
              symmetric: bool = False, device: torch.device | str | None = None) -> PackedTensor:
        """Zero-filled storage of the right shapes (to ``load_state_dict`` into, or to measure
        the bytes a weight will take without quantizing it)."""
        n_groups = group_view(torch.empty(out_features, in_features, device="meta"),
                              group_size).shape[1]
        u8 = dict(dtype=torch.uint8, device=device)
        codes = torch.zeros(packed_nbytes(out_features * in_features, bits), **u8)
        scales = torch.zeros(out_features, n_groups, dtype=SCALE_DTYPE, device=device)
        zeros = neg = None
        if fmt == "int" and not symmetric:
            zeros = torch.zeros(packed_nbytes(out_features * n_groups, bits), **u8)
        if fmt == "nf3":
            neg = torch.zeros_like(scales)
        return cls(codes, scales, zeros, fmt, bits, group_size, symmetric,
                   (out_features, in_features), neg)


def pack(w: torch.Tensor, fmt: str = "int", bits: int = 3, group_size: int = 128,
         symmetric: bool = False) -> PackedTensor:
    """Quantizes and packs ``w``.

    Args:
        w: ``[out, in]`` weight (any float dtype; gradients are not tracked).
        fmt, bits, group_size, symmetric: the format, as in ``fake_quantize``.

    Returns:
        A :class:`PackedTensor` whose ``dequantize()`` equals
        ``fake_quantize(w, fmt, bits, group_size, symmetric, scale_dtype=torch.float16)``
        bit for bit.

    Raises:
        HarnessError: bad format/bits or a group size that does not divide ``in``.
    """
    q = quantize(w.detach(), fmt, bits, group_size, symmetric, scale_dtype=SCALE_DTYPE)
    zeros = pack_bits(q.zeros, bits) if q.zeros is not None else None
    return PackedTensor(pack_bits(q.codes, bits), q.scales, zeros, fmt, bits, group_size,
                        symmetric, q.shape, q.neg_scales)
