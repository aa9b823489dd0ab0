"""Full precision: the reference every quantized run is compared with."""

from __future__ import annotations

from harness.registry import register_method
from methods.base import Method, MethodConfig


class FPConfig(MethodConfig):
    pass


@register_method("fp")
class FullPrecision(Method):
    """No quantization: the model as loaded (reference for PPL/FP ratios)."""

    Config = FPConfig
    quantizes = False
