"""HARNESS_COMPILE=1 trains through torch.compile'd decoder stacks with the eager losses."""

from __future__ import annotations

import shutil

import pytest

from harness.scheduler import execute
from harness.store import Store
from tests.methods.test_ladder import TRAIN, _spec


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_equals_eager_and_leaves_plain_modules(tmp_path, monkeypatch):
    import torch._dynamo

    import harness.train.trainer as trainer

    spec = _spec("onebit", train={**TRAIN, "steps": 3})
    losses, compiled_during_training = {}, []
    real_step = trainer._batch_at

    def spy(data, step, micro, cfg):  # the trainer calls it inside the loop
        compiled_during_training.append(bool(trainer._COMPILED))
        return real_step(data, step, micro, cfg)

    monkeypatch.setattr(trainer, "_batch_at", spy)
    for flag in ("0", "1"):
        monkeypatch.setenv("HARNESS_COMPILE", flag)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        store = Store(f"sqlite:///{tmp_path / flag}.db")
        [out] = execute([spec], store, tmp_path / flag, progress=False)
        assert out.status == "finished", out.error
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (flag == "1")  # dynamo really traced the stacks
        losses[flag] = [s.loss for s in store.train_steps(out.run_id)]
    assert compiled_during_training == [False] * 3 + [True] * 3
    assert not trainer._COMPILED  # eval and export ran on the plain modules
    assert losses["1"] == pytest.approx(losses["0"], rel=1e-5)
