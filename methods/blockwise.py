"""Calibration block by block: record the decoder blocks' calls once, then run each block on
its own (GPTQ's sequential protocol, the reference's ``llama_sequential``; AWQ's per-block
search). About 2L block forwards per batch instead of a forward of the whole model up to each
block (L^2/2), and no model-specific plumbing: the blocks are called with exactly what the
model passed the first one (attention mask, position embeddings...).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from harness.models import no_cache

#: One recorded call of a decoder block: (args, kwargs) as the model made it.
Call = tuple[tuple, dict]


class _Stop(Exception):
    """Ends a calibration forward once the blocks' calls are recorded."""


def hidden_of(call: Call) -> torch.Tensor:
    """The hidden states of a recorded block call (positional or ``hidden_states=``)."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    """``call`` with its hidden states replaced by ``hidden``."""
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _per_layer_arguments(model: nn.Module, blocks: list[nn.Module]) -> bool:
    """Whether the model calls its blocks with arguments that differ between them (masks
    chosen per layer type), so that one block's recorded arguments do not serve the others."""
    types = getattr(getattr(model, "config", None), "layer_types", None) or []
    attn = [getattr(b, "attention_type", None) for b in blocks]
    return len(set(types)) > 1 or len(set(attn)) > 1


@torch.no_grad()
def capture_calls(model: nn.Module, blocks: list[nn.Module],
                  batches: torch.Tensor) -> list[list[Call]]:
    """Per block, its (args, kwargs) on each calibration batch.

    The model's forward stops at the first block, whose calls serve every block, unless the
    blocks get different arguments (:func:`_per_layer_arguments`): then it stops after the last
    one and each block keeps its own. Only the first block's hidden states are the real inputs;
    the others are replaced as the blocks are quantized."""
    per_layer = _per_layer_arguments(model, blocks)
    watched = blocks if per_layer else blocks[:1]
    calls: list[list[Call]] = [[] for _ in watched]

    def record(i):
        def fn(_mod, args, kwargs):
            call = (args, dict(kwargs))
            # only the first block's hidden states are used: the others' are not kept
            calls[i].append(call if i == 0 else with_hidden(call, None))
            if i == len(watched) - 1 and not per_layer:
                raise _Stop
        return fn

    def stop(_mod, _args, _out):
        raise _Stop

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True)
               for i, b in enumerate(watched)]
    if per_layer:
        handles.append(blocks[-1].register_forward_hook(stop))
    device = next(model.parameters()).device
    kwargs = no_cache(model)
    try:
        for row in batches:
            with contextlib.suppress(_Stop):
                model(row.unsqueeze(0).to(device), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls if per_layer else calls * len(blocks)


@torch.no_grad()
def run_block(block: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    """The block's hidden-state outputs on ``calls`` (a tuple's first element: transformers
    versions differ in what a decoder layer returns)."""
    outs = []
    for args, kwargs in calls:
        out = block(*args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs
