"""train.grad_checkpointing: recomputed activations give the same training, and the run key
does not change (it says how memory is spent, not what is computed)."""

from __future__ import annotations

import pytest

from harness.orchestration.scheduler import execute
from harness.store import Store
from tests.methods.test_ladder import TRAIN, _spec


def test_checkpointed_training_equals_plain_and_keeps_the_run_key(tmp_path, monkeypatch):
    import transformers.modeling_utils as hf

    calls = []
    real = hf.checkpoint  # torch.utils.checkpoint.checkpoint, bound when transformers loads

    def spy(*args, **kwargs):  # what gradient_checkpointing_enable wraps for every layer
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "checkpoint", spy)
    losses, keys = {}, {}
    for flag in (False, True):
        spec = _spec("qat", train={**TRAIN, "steps": 2, "grad_checkpointing": flag})
        keys[flag] = spec.run_key
        store = Store(f"sqlite:///{tmp_path / str(flag)}.db")
        [out] = execute([spec], store, tmp_path / str(flag), progress=False)
        assert out.status == "finished", out.error
        losses[flag] = [s.loss for s in store.train_steps(out.run_id)]
        assert bool(calls) == flag  # really recomputed (non-reentrant), only when asked
    assert set(calls) == {False}
    assert keys[True] == keys[False]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
