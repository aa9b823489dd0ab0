"""Quantization core: pure formats, packing and quantized modules (no triton/ray imports)."""

from harness.quant.formats import (
    FORMATS,
    Format,
    QuantFormat,
    dequantize,
    fake_quantize,
    get_format,
    pack,
    quantize,
    register_format,
    resolve_group_size,
)
from harness.quant.linear import PackedLinear, QuantLinear
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.quant.packed import PackedTensor

__all__ = ["FORMATS", "Format", "get_format", "register_format", "PackedLinear",
           "QuantFormat", "resolve_group_size", "QuantLinear", "decoder_linear_names",
           "replace_linears", "PackedTensor", "pack", "dequantize", "fake_quantize", "quantize"]
