"""Weight formats as validated configs, and group-size resolution.

A :class:`QuantFormat` names one storage format: integer (asymmetric or symmetric, 1-8 bits),
BitDistiller's NF3-asymmetric grid, or OneBit's binary sign format. Groups run along each
row's input dimension (METHODS.md, "Shared"); ``group_size=-1`` is one group per row.
Nothing here prints or logs: callers report the resolved group size themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from harness.errors import HarnessError

#: Auto group sizes, in order of preference (METHODS.md: 128, else the largest of 64/32).
AUTO_GROUPS = (128, 64, 32)


class QuantFormat(BaseModel):
    """A weight format.

    Attributes:
        fmt: ``"int"`` (uniform integer grid), ``"nf3"`` (NF3 asymmetric, 3 bits) or
            ``"binary"`` (OneBit sign matrix, 1 bit; quantized by ``harness.quant.onebit``).
        bits: code width: 1-8 for int (2-8 when symmetric), 3 for nf3, 1 for binary.
        group_size: weights per group along the input dimension; -1 = whole row.
        symmetric: int only: scale = max|w| / (2^(b-1) - 1), no zero point.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fmt: Literal["int", "nf3", "binary"] = "int"
    bits: int
    group_size: int = 128
    symmetric: bool = False

    @model_validator(mode="after")
    def _valid(self) -> QuantFormat:
        # pydantic turns ValueError into a ValidationError that keeps the message.
        if self.fmt == "int" and not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} is outside 1-8 for integer formats; pick 1..8")
        if self.fmt == "int" and self.symmetric and self.bits < 2:
            raise ValueError("symmetric 1-bit integers have only the codes {-1, 0}; use "
                             "symmetric=False for int1, or fmt=binary for a sign format")
        if self.fmt == "nf3" and self.bits != 3:
            raise ValueError(f"nf3 is a 3-bit format (got bits={self.bits}); set bits=3 or use "
                             f"fmt=int for {self.bits} bits")
        if self.fmt != "int" and self.symmetric:
            raise ValueError(f"{self.fmt} has its own grid; drop symmetric=True (int only)")
        if self.fmt == "binary" and self.bits != 1:
            raise ValueError(f"binary is a 1-bit format (got bits={self.bits}); set bits=1")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size}: use -1 (whole row) or a positive "
                             f"size such as 128")
        return self

    def divisible(self, in_features: int) -> bool:
        """Whether this format's groups tile a row of ``in_features`` inputs exactly."""
        return self.group_size == -1 or in_features % self.group_size == 0

    @property
    def name(self) -> str:
        """Short label, e.g. ``int2-g64``, ``int3s-g128``, ``nf3-g128``, ``int4-row``."""
        kind = f"{self.fmt}{self.bits}" if self.fmt == "int" else self.fmt
        sym = "s" if self.symmetric else ""
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"{kind}{sym}-{group}"


def valid_group_sizes(in_features: Iterable[int]) -> list[int]:
    """Group sizes (32, 64, 128, 256, ... then -1) that divide every one of ``in_features``.

    Args:
        in_features: input dimensions of the layers to quantize.

    Returns:
        Ascending powers of two from 32 up to the smallest dimension that divide all of them,
        followed by -1 (whole row), which always works.
    """
    dims = sorted(set(in_features))
    out, g = [], 32
    while dims and g <= dims[0]:
        if all(d % g == 0 for d in dims):
            out.append(g)
        g *= 2
    return out + [-1]


def resolve_group_size(in_features: Iterable[int], requested: int | str | None) -> int:
    """The group size a run uses.

    Args:
        in_features: input dimensions of every layer that will be quantized.
        requested: ``None`` or ``"auto"``: 128 if it divides every dimension, else the largest
            of 64 and 32 that does, else -1 (whole row). An integer: used as is if it is -1
            or divides every dimension.

    Returns:
        The group size.

    Raises:
        HarnessError: an explicit size that does not divide every dimension (or is not a
            valid size), listing the sizes that do.
    """
    dims = sorted(set(in_features))
    if requested is None or requested == "auto":
        for g in AUTO_GROUPS:
            if all(d % g == 0 for d in dims):
                return g
        return -1
    try:
        g = int(requested)
    except (TypeError, ValueError):
        raise HarnessError(f"group size {requested!r} is not a number; use auto, -1 or one of "
                           f"{valid_group_sizes(dims)}") from None
    if g == -1 or (g > 0 and all(d % g == 0 for d in dims)):
        return g
    raise HarnessError(f"group size {g} does not divide the quantized layers' input dims "
                       f"{dims}; use one of {valid_group_sizes(dims)}")
