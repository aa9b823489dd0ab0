"""harness.train.model_transfer: the prepared model reaches the workers as a skeleton (meta
tensors) plus one weights file, and each worker rebuilds its shards from them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray")  # the skeleton is pickled with Ray's cloudpickle

from harness.train.model_transfer import (  # noqa: E402
    from_skeleton,
    materialize,
    read_weights,
    skeleton,
    write_weights,
)


class _Phase:
    """State a method shares between its layers and its objective (bitnet's phase-in)."""

    value = 0.25


def test_skeleton_and_weights_rebuild_the_model_shard_by_shard(tiny_copy, tmp_path):
    import torch.distributed as dist

    from harness.train.distributed import _shard

    model, _ = tiny_copy
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one tensor, 2 names
    phase = _Phase()
    model.model.layers[0].mlp.phase = phase
    weights_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    data = skeleton(model, phase)
    assert len(data) < weights_bytes / 10  # the weights do not travel in the pickle
    rebuilt, other = from_skeleton(data)
    assert all(p.is_meta for p in rebuilt.parameters())
    assert rebuilt.model.layers[0].mlp.phase is other  # still one object, as before pickling
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    assert not rebuilt.model.rotary_emb.inv_freq.is_meta  # not in the state dict: travels

    path = tmp_path / "model.safetensors"
    write_weights(model, path)
    back = read_weights(path)
    assert set(back) == set(model.state_dict())  # the tied name restored as an alias
    assert back["lm_head.weight"] is back["model.embed_tokens.weight"]

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _shard(rebuilt)
        materialize(rebuilt, torch.device("cpu"), path, rank=0)
        ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            # the rotary table that to_empty reallocated is put back: the same outputs
            torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
