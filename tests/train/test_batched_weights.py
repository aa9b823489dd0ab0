"""The trainer computes every layer's weight in one go per pass unless switched off."""

from __future__ import annotations

import copy

import torch

from tests.quant.test_onebit import _tiny_onebit


def test_trainer_batches_onebit_weights_unless_switched_off(monkeypatch):
    from harness.quant.batched import BatchedOneBit
    from harness.train.trainer import _batched_weights

    model = _tiny_onebit()
    hooks = _batched_weights(model, torch.device("cpu"))
    assert [type(h) for h in hooks] == [BatchedOneBit] and len(hooks[0].layers) == 14
    assert len(model._forward_pre_hooks) == 1
    hooks[0].remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    monkeypatch.setenv("HARNESS_BATCHED_WEIGHTS", "0")
    assert _batched_weights(model, torch.device("cpu")) == []
    assert not model._forward_pre_hooks


def test_trainer_leaves_no_hooks_on_a_model_without_onebit_layers():
    from harness.models import load_model
    from harness.train.trainer import _batched_weights

    model = copy.deepcopy(load_model("tiny-llama")[0])
    assert _batched_weights(model, torch.device("cpu")) == []  # fake quant batches on CUDA only
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_trainer_batches_fake_quant_on_cuda_by_default(monkeypatch):
    from harness.models import load_model
    from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears
    from harness.quant.batched import BatchedFakeQuant
    from harness.train.trainer import _batched_weights

    model = copy.deepcopy(load_model("tiny-llama")[0])
    q = QuantFormat(fmt="int", bits=2, group_size=32)
    replace_linears(model, decoder_linear_names(model), lambda _n, lin: QuantLinear.from_linear(lin, q))
    assert _batched_weights(model, torch.device("cpu")) == []  # the Triton kernel is CUDA's
    hooks = _batched_weights(model, torch.device("cuda"))  # hooks only: nothing touches CUDA
    assert [type(h) for h in hooks] == [BatchedFakeQuant] and len(hooks[0].layers) == 14
    hooks[0].remove()
    monkeypatch.setenv("HARNESS_BATCHED_WEIGHTS", "0")
    assert _batched_weights(model, torch.device("cuda")) == []
    assert not model._forward_pre_hooks and not model._forward_hooks
