"""RTN: round-to-nearest group-wise quantization, the baseline of the ladder."""

from __future__ import annotations

from harness.api import Method
from harness.registry import register_method
from methods.weightquant import WeightQuantConfig, pack_all, to_quant_linears


class RTNConfig(WeightQuantConfig):
    pass


@register_method("rtn")
class RTN(Method):
    """Round-to-nearest, asymmetric integer (or NF3) per group, no calibration."""

    Config = RTNConfig

    def prepare(self, model, ctx):
        return to_quant_linears(model, self.config)

    def finalize(self, model, ctx):
        return pack_all(model)
