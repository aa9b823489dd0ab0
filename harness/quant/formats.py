"""Quantization formats as validated configs, and group-size resolution."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from harness.errors import HarnessError
from harness.quant.grid import valid_group_sizes


class QuantFormat(BaseModel):
    """A weight format: integer (asym/sym, 1-8 bits), NF3 asymmetric, or binary (OneBit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fmt: Literal["int", "nf3", "binary"] = "int"
    bits: int
    group_size: int = 128
    symmetric: bool = False

    @model_validator(mode="after")
    def _valid(self):
        if self.fmt in ("int", "nf3"):  # the quantizers' own rules, one source for both
            from harness.quant.primitives import _check

            try:
                _check(self.fmt, self.bits, self.symmetric)
            except HarnessError as exc:
                raise ValueError(str(exc)) from None
        if self.fmt == "nf3" and self.symmetric:
            raise ValueError("nf3 is asymmetric by construction (max and |min| scale each "
                             "side); drop symmetric or use fmt=int")
        if self.fmt == "binary" and self.bits != 1:
            raise ValueError("binary is a 1-bit format; set bits=1")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size}: use -1 (per row) or a positive size")
        return self

    def divisible(self, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0


def resolve_group_size(in_features: Iterable[int], requested: int | str | None) -> int:
    """The group size a run uses.

    ``None``/``"auto"``: 128 if it divides every quantized layer's input, else the largest of
    64 and 32 that does, else -1 (per row). An explicit size must divide every input.

    Raises:
        HarnessError: an explicit size that does not divide, listing the sizes that do.
    """
    dims = sorted(set(in_features))
    if requested in (None, "auto"):
        for g in (128, 64, 32):
            if all(d % g == 0 for d in dims):
                return g
        return -1
    g = int(requested)
    if g == -1 or (g > 0 and all(d % g == 0 for d in dims)):
        return g
    raise HarnessError(f"group size {g} does not divide the quantized layers' input dims "
                       f"{dims}; use one of {valid_group_sizes(dims)}")
