"""Quantization core: pure primitives, formats, bit packing and quantized modules.

Importing this package pulls in torch and pydantic only: no triton (CUDA kernels are imported
on first use by a CUDA tensor), ray, streamlit, plotly or lm-eval.
"""

from harness.quant.formats import QuantFormat, resolve_group_size
from harness.quant.linear import QuantLinear
from harness.quant.modules import decoder_linear_names, quantized_modules, replace_linears
from harness.quant.packed import PackedTensor, pack
from harness.quant.primitives import dequantize, fake_quantize, quantize

__all__ = ["PackedTensor", "QuantFormat", "QuantLinear", "decoder_linear_names", "dequantize",
           "fake_quantize", "pack", "quantize", "quantized_modules", "replace_linears",
           "resolve_group_size"]
