"""Training's autocast: which dtype on which device, and the frozen teacher's linear weights
cast once to it rather than on every forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA; None elsewhere (the CPU trains in fp32, without autocast)."""
    return torch.bfloat16 if device.type == "cuda" else None


def training_autocast(device: torch.device) -> AbstractContextManager:
    """The autocast context a training step's forward runs in on ``device``."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


@contextmanager
def frozen_linears_in(model: nn.Module | None, dtype: torch.dtype | None) -> Iterator[int]:
    """Holds ``model``'s frozen ``nn.Linear`` weights and biases in ``dtype`` (autocast's) while
    the context is open; yields how many tensors it cast.

    Autocast casts a linear's weight to its dtype in every forward and keeps the cast only for
    trainable leaves within one autocast region, so a frozen teacher pays one cast op and an
    fp32 weight read per linear per step. The matmul sees the same bf16 values either way, so
    outputs are bit for bit the same. Weights shared with an embedding (a tied ``lm_head``)
    stay: the lookup would change dtype. The originals wait on the host and are put back, so
    nothing after the training loop sees a changed model.

    Args:
        model: the teacher, or None (nothing to do).
        dtype: autocast's dtype, or None when training without autocast (nothing to do).
    """
    if model is None or dtype is None:
        yield 0
        return
    tied = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for m in model.modules():
            if not isinstance(m, nn.Linear) or m.weight.data_ptr() in tied:
                continue
            for p in (m.weight, m.bias):
                if p is not None and not p.requires_grad and p.dtype != dtype:
                    saved.append((p, p.data.to("cpu")))
                    p.data = p.data.to(dtype)
        yield len(saved)
    finally:
        for p, original in saved:
            p.data = original.to(p.device)
