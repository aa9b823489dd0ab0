"""The prepared model to a run's N training workers without a whole copy in each.

Shipped whole through Ray's object store, every worker held the model about three times
before sharding it (the store's pages, and unpickling's copies: measured on SmolLM2, see
docs/RESULTS.md): for a 7B model some 80 GB of host memory per worker. Instead the run's
process writes the weights once to a safetensors file and sends a *skeleton*: the model with
every tensor of its state dict swapped for a meta tensor of the same shape while Ray pickles it
(:func:`as_skeleton`; the modules, their settings and their other tensors, e.g. rotary tables,
travel as they are).
Each worker rebuilds the skeleton, shards it with FSDP2 while it is still on the meta device,
allocates only its shards, and rank 0 reads the file and broadcasts it tensor by tensor, each
worker keeping its part (``set_model_state_dict(..., broadcast_from_rank0=True)``). The teacher
comes the same way from rank 0, which alone loads it, sharded or whole.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def write_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict in ``path``; a tensor shared under several names (a tied
    lm_head) is written once, the other names recorded as its aliases."""
    kept: dict[tuple, str] = {}  # (storage, offset, shape) -> the name written
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """What :func:`write_weights` wrote, every name of a shared tensor included."""
    with safe_open(str(path), framework="pt") as f:
        out = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        out[alias] = out[name]
    return out


@contextmanager
def as_skeleton(model: nn.Module) -> Iterator[nn.Module]:
    """While open, ``model``'s parameters and persistent buffers (its state dict) are meta
    tensors of the same shapes, one per original tensor (a tied lm_head stays tied); pickle it
    then (``ray.put``, ``broadcast_object_list``) to send its skeleton. Objects that share state
    with the model (an objective whose ``on_step`` sets a value its layers read) go into the same
    pickle, so they still share it. The originals are back when the context closes."""
    metas: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for mod in model.modules():
        for table, skip in ((mod._parameters, set()), (mod._buffers,
                                                       mod._non_persistent_buffers_set)):
            for name, t in table.items():
                if t is None or name in skip:
                    continue
                if id(t) not in metas:
                    meta = torch.empty_like(t, device="meta")
                    metas[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else meta
                swapped.append((table, name, t))
                table[name] = metas[id(t)]
    try:
        yield model
    finally:
        for table, name, t in swapped:
            table[name] = t


def materialize(model: nn.Module, device: torch.device, full: dict[str, torch.Tensor]) -> None:
    """Allocates the (sharded) ``model``'s tensors on ``device`` and fills them from ``full``,
    rank 0's whole state dict (``{}`` on the other ranks); every worker must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # to_empty reallocates every buffer: the ones that travelled with the skeleton come back
    kept = [(mod, name, buf) for mod in model.modules()
            for name, buf in mod._buffers.items() if buf is not None and not buf.is_meta]
    model.to_empty(device=device)
    for mod, name, buf in kept:
        mod._buffers[name] = buf.to(device)
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))


def from_rank0(load, device: torch.device, rank: int, shard=None) -> nn.Module:
    """A model only rank 0 loads (``load()``, on the host), on every worker's ``device``: the
    others rebuild it from rank 0's skeleton and its broadcast weights. With ``shard`` (applied
    on the meta device) each worker allocates only its shards; without, a whole copy. Every
    worker must call it."""
    import torch.distributed as dist

    whole = load() if rank == 0 else None
    box = [None]
    if rank == 0:
        with as_skeleton(whole):
            box[0] = copy.deepcopy(whole)  # meta tensors: nothing of size is copied
    dist.broadcast_object_list(box, src=0)
    model = revive(box[0])
    if shard is not None:
        shard(model)
    materialize(model, device, whole.state_dict() if rank == 0 else {})
    return model


def revive(model: nn.Module) -> nn.Module:
    """A model unpickled in a fresh process, made to record what it records in the process that
    built it. transformers (5.x) keeps what each model class can record (hidden states,
    attentions) in a process-wide registry that ``PreTrainedModel.__init__`` fills; unpickling
    runs no ``__init__``, so until some model of that class is built in the process, asking for
    hidden states returns None (OneBit's loss needs them)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers: nothing to do, or nothing we know how to do
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
    return model
