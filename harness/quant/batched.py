"""One fake-quantization launch per pass for a whole model (CUDA with Triton).

Per-layer fake quantization costs, for every linear and every step, two kernel launches, an
autograd node and some Python; SmolLM2 has 210 decoder linears, so a step pays ~420 launches
for work the GPU finishes in about a millisecond. ``BatchedFakeQuant`` instead quantizes every
training-state ``QuantLinear`` of the model in one launch per distinct format before the forward
(a pre-forward hook) and lets autograd call one backward for all of them; each layer reads its
own output. Values and gradients equal the per-layer path's bit for bit.

Layers it cannot batch (packed, on the CPU, misaligned) keep the per-layer path. The batched
outputs live from the model's forward to its backward, as the per-layer outputs already do
(``F.linear`` saves its weight), so peak memory does not change.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn

from harness.quant.linear import QuantLinear


def _kernel_device(t: torch.Tensor) -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests use it.
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class BatchedFakeQuant:
    """Attach to ``model`` (``BatchedFakeQuant(model)``); ``remove()`` detaches it."""

    def __init__(self, model: nn.Module) -> None:
        from harness.quant.primitives import _triton_ok

        self.layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        self.enabled = _triton_ok()
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)]

    def batches(self) -> dict[tuple, list[QuantLinear]]:
        """Training-state layers grouped by everything one launch must share."""
        from harness.quant.triton_fq import aligned

        out: dict[tuple, list[QuantLinear]] = defaultdict(list)
        for m in self.layers:
            w = getattr(m, "weight", None)
            if m.packed or w is None or not _kernel_device(w) or not aligned(w):
                continue
            q = m.qformat
            group = m.in_features if q.group_size == -1 else q.group_size
            out[(q.fmt, q.bits, group, q.symmetric, m.detach_scales, w.dtype, w.device)].append(m)
        return out

    def _before(self, module, args) -> None:
        if not self.enabled:
            return
        from harness.quant.triton_fq import fake_quantize_many

        for (fmt, bits, group, sym, detach, _dtype, device), layers in self.batches().items():
            out_dtype = None
            if torch.is_autocast_enabled(device.type):
                out_dtype = torch.get_autocast_dtype(device.type)
            outs = fake_quantize_many([m.weight for m in layers], fmt, bits, group, sym,
                                      detach, torch.float16, out_dtype)
            for m, w in zip(layers, outs, strict=True):
                m.batched_weight = w

    def _after(self, module, args, output) -> None:
        for m in self.layers:
            m.batched_weight = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._after(None, None, None)
