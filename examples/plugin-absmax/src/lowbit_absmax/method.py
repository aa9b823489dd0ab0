"""``absmax``: symmetric round-to-nearest with scale = max|w| / (2^(b-1) - 1) per group.

A plugin built from the harness's shared parts: the weight-format config, the conversion to
``QuantLinear`` and packing. The grid is symmetric (no zero point), so packed storage holds no
zeros and the bits/weight the harness measures are lower than asymmetric RTN's.
"""

from __future__ import annotations

from pydantic import Field

from methods.base import Method
from methods.weightquant import WeightQuantConfig, pack_all, to_quant_linears


class AbsMaxConfig(WeightQuantConfig):
    bits: int = Field(4, ge=2, le=8, description="weight bits (symmetric grid needs >= 2)")
    symmetric: bool = Field(True, description="absmax is symmetric by definition")


class AbsMax(Method):
    """Symmetric absmax round-to-nearest per group (example plugin)."""

    Config = AbsMaxConfig

    def prepare(self, model, ctx):
        return to_quant_linears(model, self.config)

    def finalize(self, model, ctx):
        return pack_all(model)
