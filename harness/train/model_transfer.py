"""The prepared model to a run's N training workers without a whole copy in each.

Shipped whole through Ray's object store, every worker held the model about three times
before sharding it (the store's pages, and unpickling's copies: measured on SmolLM2, see
docs/RESULTS.md): for a 7B model some 80 GB of host memory per worker. Instead the run's
process writes the weights once to a safetensors file and sends a *skeleton*: the model
pickled with every tensor of its state dict replaced by a meta tensor of the same shape (the
modules, their settings and their other tensors, e.g. rotary tables, travel as they are).
Each worker rebuilds the skeleton, shards it with FSDP2 while it is still on the meta device,
allocates only its shards, and rank 0 reads the file and broadcasts it tensor by tensor, each
worker keeping its part (``set_model_state_dict(..., broadcast_from_rank0=True)``).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

_META = "harness-meta-tensor"


def write_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict in ``path``; a tensor shared under several names (a tied
    lm_head) is written once, the other names recorded as its aliases."""
    kept: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if hash(key) in kept:
            aliases[name] = kept[hash(key)]
            continue
        kept[hash(key)] = name
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


def skeleton(model: nn.Module, *others) -> bytes:
    """``(model, *others)`` pickled with the model's state dict's tensors as meta-tensor
    placeholders. Objects that share state with the model (an objective whose ``on_step``
    sets a value its layers read) go in the same pickle, so they still share it."""
    from ray import cloudpickle  # pickles what plain pickle cannot (a method's local classes)

    in_state = {id(t) for t in model.state_dict(keep_vars=True).values()}

    class Pickler(cloudpickle.CloudPickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.Tensor) and id(obj) in in_state:
                # id: pickle's memo does not cover persistent ids, and a tensor seen twice (a
                # tied lm_head) must come back as one
                return (_META, id(obj), tuple(obj.shape), str(obj.dtype).removeprefix("torch."),
                        isinstance(obj, nn.Parameter), obj.requires_grad)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((model, *others))
    return buf.getvalue()


def from_skeleton(data: bytes) -> tuple:
    """``(model, *others)`` of :func:`skeleton`, the model's state dict's tensors on the meta
    device, each tensor shared before shared again."""

    made: dict[int, torch.Tensor] = {}

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            tag, key, shape, dtype, is_param, requires_grad = pid
            if tag != _META:
                raise pickle.UnpicklingError(f"unknown persistent id {tag!r}")
            if key not in made:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                made[key] = nn.Parameter(t, requires_grad=requires_grad) if is_param else t
            return made[key]

    return Unpickler(io.BytesIO(data)).load()


def materialize(model: nn.Module, device: torch.device, weights: Path, rank: int) -> None:
    """Allocates the (sharded) ``model``'s tensors on ``device`` and fills them from
    ``weights``, which only rank 0 reads; every worker must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # to_empty reallocates every buffer: the ones that travelled with the skeleton come back
    kept = [(mod, name, buf) for mod in model.modules()
            for name, buf in mod._buffers.items() if buf is not None and not buf.is_meta]
    model.to_empty(device=device)
    for mod, name, buf in kept:
        mod._buffers[name] = buf.to(device)
    full = read_weights(weights) if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
