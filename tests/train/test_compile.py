"""HARNESS_COMPILE=1 trains through torch.compile'd decoder stacks with the eager losses."""

from __future__ import annotations

import shutil

import pytest

from harness.orchestration.scheduler import execute
from harness.store import Store
from tests.methods.test_ladder import TRAIN, _spec


def test_compiled_training_equals_eager_and_leaves_plain_modules(tmp_path, monkeypatch):
    # scripts/install-test-deps (make test-deps) installs the compiler: a missing one is a
    # broken set-up, not a reason to skip
    assert shutil.which("g++") or shutil.which("c++"), \
        "torch.compile on the CPU needs a C++ compiler: run `make test-deps` (installs g++)"
    import torch._dynamo

    import harness.train.trainer as trainer

    spec = _spec("onebit", train={**TRAIN, "steps": 3})
    losses, compiled_during_training = {}, []
    real_step = trainer.batch_at

    def spy(data, step, micro, cfg):  # the trainer calls it inside the loop
        compiled_during_training.append(bool(trainer._COMPILED))
        return real_step(data, step, micro, cfg)

    monkeypatch.setattr(trainer, "batch_at", spy)
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


@pytest.mark.parametrize("value, options", [("", None), ("0", None), ("1", {}),
                                            ("reduce-overhead", {"mode": "reduce-overhead"})])
def test_compile_switch_values(monkeypatch, value, options):
    from harness.train.trainer import compile_options

    monkeypatch.setenv("HARNESS_COMPILE", value)
    assert compile_options() == options


def test_unknown_compile_mode_fails_the_run_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_COMPILE", "fast")
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    [out] = execute([_spec("onebit", train={**TRAIN, "steps": 2})], store, tmp_path,
                    progress=False)
    assert out.status == "failed"
    assert out.error.startswith("HARNESS_COMPILE='fast' is not 0, 1 or a torch.compile mode")
    assert store.train_steps(out.run_id) == []
