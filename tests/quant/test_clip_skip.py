"""Which layers the clipping search leaves alone: the reference's autoclip.py skips q/k."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.api import NullRecorder
from harness.quant.clip import reference_skips


@pytest.mark.parametrize("name,skipped", [
    ("q_proj", True), ("k_proj", True), ("v_proj", False), ("o_proj", False),
    ("gate_proj", False), ("up_proj", False), ("down_proj", False),
    ("query_key_value", True), ("Wqkv", True), ("fc1", False), ("dense", False),
])
def test_reference_skip_list(name, skipped):
    assert reference_skips(name) is skipped


def _ctx(vocab: int) -> SimpleNamespace:
    calib = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(calibration=lambda: calib, recorder=NullRecorder(),
                           spec=SimpleNamespace(seed=0), run_dir=Path("."))


def _prepared(method_name: str, model, **config):
    from harness.registry import get_method

    cls = get_method(method_name)
    cfg = cls.Config(bits=2, group_size=32, calib_samples=2, calib_seq_len=64,
                     clip_tokens=64, clip_grid=4, **config) if method_name == "clip" \
        else cls.Config(bits=2, group_size=32)
    model = cls(cfg).prepare(model, _ctx(model.config.vocab_size))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}


def test_default_leaves_q_and_k_at_plain_rtn(tiny):
    import copy

    model, _ = tiny
    rtn = _prepared("rtn", copy.deepcopy(model))
    clip = _prepared("clip", copy.deepcopy(model))
    clip_all = _prepared("clip", copy.deepcopy(model), skip_qk=False)
    qk = [n for n in rtn if n.endswith(("q_proj.weight", "k_proj.weight"))]
    others = [n for n in rtn if ".layers." in n and n not in qk and "norm" not in n]
    assert len(qk) == 4 and len(others) == 10  # 2 layers x (q, k) and x (v, o, gate, up, down)
    for n in qk:  # the latent weight is the model's own, so its quantization is RTN's
        assert torch.equal(clip[n], rtn[n]), n
    assert any(not torch.equal(clip[n], rtn[n]) for n in others)
    assert any(not torch.equal(clip_all[n], rtn[n]) for n in qk)  # skip_qk=false clips them
    for n in others:  # and the rest is searched alike either way
        assert torch.equal(clip[n], clip_all[n]), n
