"""Quantization core: pure formats, packing and quantized modules (no triton/ray imports)."""

from harness.quant.formats import QuantFormat, resolve_group_size
from harness.quant.linear import QuantLinear
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.quant.packed import PackedTensor, pack
from harness.quant.primitives import dequantize, fake_quantize, quantize

__all__ = ["QuantFormat", "resolve_group_size", "QuantLinear", "decoder_linear_names",
           "replace_linears", "PackedTensor", "pack", "dequantize", "fake_quantize", "quantize"]
