"""Every layer's weight in one go per pass, instead of layer by layer.

Per-layer weight functions cost, for every linear and every step, a handful of kernel launches,
an autograd node and some Python; SmolLM2 has 210 decoder linears, so a step pays thousands of
dispatches for work the GPU finishes in about a millisecond. Here a pre-forward hook on the
model computes every training-state layer's weight at once and autograd calls one backward
for all of them; each layer reads its own output. Values and gradients equal the per-layer
path's bit for bit.

- ``BatchedFakeQuant``: ``QuantLinear`` (QAT, BitDistiller), one Triton launch per distinct
  format (CUDA; on the H200 the QAT step went from 1.48x to 1.07x the plain step).
- ``BatchedOneBit``: ``OneBitLinear``, ``(h g^T) * sign(W)`` as multi-tensor ops (any device),
  one node per chunk of layers so that its fp32 temporaries stay bounded.

Layers it cannot batch (packed, on the CPU for the Triton kernel, misaligned) keep the
per-layer path. The batched outputs live from the model's forward to its backward, as the
per-layer outputs already do (``F.linear`` saves its weight), so peak memory changes only by
those temporaries (OneBit: about 0.5 GB at most, whatever the model's size).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn

from harness.quant.linear import QuantLinear
from harness.quant.onebit import OneBitLinear, effective_weights
from harness.quant.primitives import triton_ok


def _kernel_device(t: torch.Tensor) -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests use it.
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class _PerPassWeights:
    """Hooks on ``model`` that set ``batched_weight`` on its ``layer_type`` layers before each
    forward (``_before``) and clear it after; ``remove()`` detaches them."""

    layer_type: type[nn.Module]

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, self.layer_type)]
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)
                         ] if self.layers else []  # nothing to batch: leave the model alone

    def _before(self, module, args) -> None:
        raise NotImplementedError

    def _after(self, module, args, output) -> None:
        for m in self.layers:
            m.batched_weight = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._after(None, None, None)


class BatchedFakeQuant(_PerPassWeights):
    """Attach to ``model`` (``BatchedFakeQuant(model)``); ``remove()`` detaches it."""

    layer_type = QuantLinear

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.enabled = triton_ok()

    def batches(self) -> dict[tuple, list[QuantLinear]]:
        """Training-state layers grouped by everything one launch must share."""
        from harness.quant.triton_fq import aligned  # imports triton: CUDA machines only

        out: dict[tuple, list[QuantLinear]] = defaultdict(list)
        for m in self.layers:
            w = getattr(m, "weight", None)
            if (m.packed or w is None or m.format.kernel != "harness.quant.triton_fq"
                    or not _kernel_device(w) or not aligned(w)):
                continue  # ternary and other kernel-less formats keep the per-layer path
            q = m.qformat
            group = m.in_features if q.group_size == -1 else q.group_size
            out[(q.fmt, q.bits, group, q.symmetric, m.detach_scales, w.dtype, w.device)].append(m)
        return out

    def _before(self, module, args) -> None:
        if not self.enabled:
            return
        from harness.quant.triton_fq import fake_quantize_many  # imports triton, as above

        for (fmt, bits, group, sym, detach, _dtype, device), layers in self.batches().items():
            out_dtype = None
            if torch.is_autocast_enabled(device.type):
                out_dtype = torch.get_autocast_dtype(device.type)
            outs = fake_quantize_many([m.weight for m in layers], fmt, bits, group, sym,
                                      detach, torch.float16, out_dtype)
            for m, w in zip(layers, outs, strict=True):
                m.batched_weight = w


class BatchedOneBit(_PerPassWeights):
    """Attach to ``model`` (``BatchedOneBit(model)``); ``remove()`` detaches it. Training-form
    ``OneBitLinear`` layers get their effective weight from one
    :func:`~harness.quant.onebit.effective_weights` call per device and weight dtype, in fp32
    arithmetic (what each layer computes for fp32 and half inputs) and in the autocast dtype
    when autocast is on (the dtype the matmul casts it to anyway)."""

    layer_type = OneBitLinear
    # Weights per effective_weights call: its backward's fp32 temporaries are a few times this
    # (~0.5 GB), where all of a 7B model's weights at once would be tens of GB. SmolLM2's 106M
    # weights take 4 calls, still a few dozen dispatches per pass instead of thousands.
    chunk_weights = 1 << 25

    def _before(self, module, args) -> None:
        groups: dict[tuple, list[OneBitLinear]] = defaultdict(list)
        for m in self.layers:
            if not m.is_packed and m.weight.dtype in (torch.float32, torch.bfloat16,
                                                       torch.float16):
                groups[(m.weight.device, m.weight.dtype)].append(m)
        for (device, _dtype), layers in groups.items():
            out_dtype = None
            if torch.is_autocast_enabled(device.type):
                out_dtype = torch.get_autocast_dtype(device.type)
            for chunk in _chunks(layers, self.chunk_weights):
                outs = effective_weights([m.weight for m in chunk], [m.g for m in chunk],
                                         [m.h for m in chunk], torch.float32, out_dtype)
                for m, w in zip(chunk, outs, strict=True):
                    m.batched_weight = w


def _chunks(layers: list[OneBitLinear], budget: int) -> list[list[OneBitLinear]]:
    """Consecutive runs of ``layers`` of at most ``budget`` weights each (a larger layer alone)."""
    out: list[list[OneBitLinear]] = []
    size = budget
    for m in layers:
        n = m.weight.numel()
        if size + n > budget:
            out.append([])
            size = 0
        out[-1].append(m)
        size += n
    return out
