"""harness.train.model_transfer: the prepared model reaches the workers as a skeleton (meta
tensors) plus one weights file, and each worker rebuilds its shards from them."""

from __future__ import annotations

import pytest
import torch

from harness.train.model_transfer import (
    as_skeleton,
    from_rank0,
    materialize,
    read_weights,
    write_weights,
)

cloudpickle = pytest.importorskip("ray.cloudpickle")  # what ray.put pickles with


class _Phase:
    """State a method shares between its layers and its objective (bitnet's phase-in)."""

    value = 0.25


def test_skeleton_and_weights_rebuild_the_model_shard_by_shard(tiny_copy, tmp_path):
    import torch.distributed as dist

    from harness.train.distributed import _shard

    model, _ = tiny_copy
    model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one tensor, 2 names
    phase = _Phase()
    model.model.layers[0].mlp.phase = phase
    weights_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    embedding = model.model.embed_tokens.weight
    with as_skeleton(model):
        data = cloudpickle.dumps((model, phase))
    assert model.model.embed_tokens.weight is embedding and not embedding.is_meta  # put back
    assert len(data) < weights_bytes / 10  # the weights do not travel in the pickle
    rebuilt, other = cloudpickle.loads(data)
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
        materialize(rebuilt, torch.device("cpu"), read_weights(path))
        ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            # the rotary table that to_empty reallocated is put back: the same outputs
            torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)
            # the teacher: loaded by rank 0 alone, the other ranks rebuilt from its skeleton
            # (here one rank: the broadcast path all the same), sharded or whole
            for shard in (_shard, None):
                teacher = from_rank0(lambda: model, torch.device("cpu"), 0, shard)
                assert teacher is not model and not teacher.training
                torch.testing.assert_close(teacher(ids).logits, model(ids).logits, rtol=0,
                                           atol=0)
    finally:
        dist.destroy_process_group()


def test_revive_restores_hidden_states_of_a_model_unpickled_in_a_fresh_process(tiny_copy,
                                                                               monkeypatch):
    """transformers fills a process-wide registry in each model's __init__; a worker that only
    unpickles models starts with it empty and gets no hidden states (OneBit's loss needs
    them) until :func:`revive`."""
    output_capturing = pytest.importorskip("transformers.utils.output_capturing")
    from harness.train.model_transfer import revive
    from harness.train.trainer import _forward

    model, _ = tiny_copy
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(output_capturing, "_CAN_RECORD_REGISTRY",
                        type(output_capturing._CAN_RECORD_REGISTRY)())  # a fresh process's
    fresh = cloudpickle.loads(cloudpickle.dumps(model))
    with torch.no_grad():
        assert _forward(fresh, ids, hidden=True)[1] is None
        assert len(_forward(revive(fresh), ids, hidden=True)[1]) == 3  # embeddings + 2 layers
