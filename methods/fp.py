"""The unquantized reference every quantized run is compared with: the model as loaded (for
the embedded SmolLM2, its Q4_1 GGUF dequantized to float32), evaluated like the others."""

from __future__ import annotations

from harness.api import Method, MethodConfig
from harness.registry import register_method


class FPConfig(MethodConfig):
    pass


@register_method("fp")
class FullPrecision(Method):
    """No quantization: the model as loaded (reference for PPL/FP ratios)."""

    Config = FPConfig
    quantizes = False
