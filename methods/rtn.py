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

    def init_weights(self, model, ctx) -> None:
        """Sets the latent weights (in place) that the format's quantizer turns into this
        method's result; RTN keeps the pretrained ones. The post-training rungs override it, and
        the trained methods' ``init`` borrows it (``methods.init``)."""

    def prepare(self, model, ctx):
        self.init_weights(model, ctx)
        return to_quant_linears(model, self.config)

    def finalize(self, model, ctx):
        return pack_all(model)
