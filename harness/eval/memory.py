"""Memory accounting measured from the tensors a model holds (DESIGN.md, "Evaluation").

Quantized modules (anything with ``packed_nbytes()`` and ``num_weights``: QuantLinear,
OneBitLinear, a plugin's layer) report the bytes of their packed tensors. Everything else --
parameters and persistent buffers -- is counted as a full-precision checkpoint stores it:
floating-point tensors at 2 bytes per element (fp16/bf16), integer tensors at their own width.
Non-persistent buffers (rotary ``inv_freq``, caches) are not part of a checkpoint and are left
out. Tensors shared by several modules (tied embeddings) count once.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

FP_BYTES = 2  # fp16 / bf16 storage of the unquantized tensors


def _checkpoint_tensors(model: nn.Module, skip: list[str]):
    """(name, tensor) of parameters and persistent buffers outside the ``skip`` modules."""
    for mod_name, module in model.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        for name, p in module._parameters.items():
            if p is not None:
                yield f"{mod_name}.{name}", p
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield f"{mod_name}.{name}", b


def model_memory(model: nn.Module) -> dict[str, float]:
    """Storage of ``model``: packed quantized layers plus everything else at fp16.

    Args:
        model: any module; quantized layers found by ``harness.quant.modules.quantized_modules``.

    Returns:
        ``quantized_bytes`` (sum of ``packed_nbytes()``), ``fp_bytes``, ``total_bytes``,
        ``size_mb`` (total / 1e6), ``quantized_weights`` (number of quantized weights),
        ``bits_per_weight`` (8 * quantized_bytes / quantized_weights; 16.0 with no quantized
        module), ``compression_vs_fp16`` (the same model's fp16 bytes / total_bytes). All
        values are floats, ready for the metrics table.
    """
    from harness.quant.modules import quantized_modules

    qmods = dict(quantized_modules(model))
    quantized_bytes = sum(int(m.packed_nbytes()) for m in qmods.values())
    quantized_weights = sum(int(m.num_weights) for m in qmods.values())
    # The fp16 model would hold each quantized layer's weights and its bias (if any).
    fp16_equivalent = quantized_weights + sum(
        m.bias.numel() for m in qmods.values() if isinstance(getattr(m, "bias", None), torch.Tensor))
    seen: set[tuple] = set()
    fp_bytes = fp_elems = 0
    for _name, t in _checkpoint_tensors(model, list(qmods)):
        key = (t.device, t.data_ptr(), t.numel(), t.dtype) if t.numel() else (id(t),)
        if key in seen:
            continue
        seen.add(key)
        fp_elems += t.numel()
        fp_bytes += t.numel() * (FP_BYTES if t.is_floating_point() else t.element_size())
    total = quantized_bytes + fp_bytes
    return {
        "quantized_bytes": float(quantized_bytes),
        "fp_bytes": float(fp_bytes),
        "total_bytes": float(total),
        "size_mb": total / 1e6,
        "quantized_weights": float(quantized_weights),
        "bits_per_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else 16.0,
        "compression_vs_fp16": (FP_BYTES * (fp_elems + fp16_equivalent) / total
                                if total else 1.0),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (2^20 bytes).

    ``resource.getrusage`` reports the true peak on Linux/macOS; elsewhere psutil's peak
    working set (Windows) or current RSS is the best available.
    """
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20


def peak_gpu_mb() -> float:
    """Peak CUDA memory allocated by torch in MB since start (or the last reset); 0.0 without CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
