"""Memory accounting measured from the tensors a model holds."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from harness.quant.modules import quantized_modules


def model_memory(model: nn.Module) -> dict[str, float]:
    """Bytes of packed quantized layers and of everything else.

    Quantized modules report their packed bytes (codes, scales, zeros, value vectors...).
    Every other parameter and persistent buffer counts at 2 bytes per element — fp16/bf16, the
    way a full-precision checkpoint is stored and compared — with tied tensors counted once.
    """
    qmods = dict(quantized_modules(model))
    quantized_bytes = sum(m.packed_nbytes() for m in qmods.values())
    quantized_weights = sum(m.num_weights for m in qmods.values())
    inside = set()
    for name in qmods:
        for sub, _ in qmods[name].named_parameters(prefix=name):
            inside.add(sub)
        for sub, _ in qmods[name].named_buffers(prefix=name):
            inside.add(sub)
    seen, fp_elems = set(), 0
    named = list(model.named_parameters(remove_duplicate=False)) + [
        (n, b) for n, b in model.named_buffers(remove_duplicate=False)
        if b.dtype.is_floating_point and "rotary" not in n and "inv_freq" not in n]
    for name, t in named:
        if name in inside or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        fp_elems += t.numel()
    fp_bytes = 2 * fp_elems
    total = quantized_bytes + fp_bytes
    total_params = fp_elems + quantized_weights
    return {
        "quantized_bytes": float(quantized_bytes),
        "fp_bytes": float(fp_bytes),
        "total_bytes": float(total),
        "size_mb": total / 1e6,
        "quantized_weights": float(quantized_weights),
        "bits_per_weight": 8 * quantized_bytes / quantized_weights if quantized_weights else 16.0,
        "compression_vs_fp16": 2 * total_params / total if total else 1.0,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / 1024 if sys.platform == "darwin" else kb / 1024


def peak_gpu_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peaks() -> None:
    """Starts a new peak-memory window: CUDA's allocator peak and, on Linux, the process's RSS
    high-water mark (``/proc/self/clear_refs``); elsewhere RSS peaks stay cumulative."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def window_peaks() -> dict[str, float]:
    """Peak host RSS and, where CUDA is, GPU memory (MB) since the last :func:`reset_peaks`.
    Without CUDA there is no "gpu" key: a CPU run has no GPU peak, not a peak of 0 MB."""
    rss = _vm_hwm_mb()
    peaks = {"rss": rss if rss is not None else peak_rss_mb()}
    if torch.cuda.is_available():
        peaks["gpu"] = peak_gpu_mb()
    return peaks
