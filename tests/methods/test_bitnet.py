"""bitnet: lambda phase-in of the ternary weights, absmax activations, the trainer's step hook
and a CLI run on tiny-llama."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from harness.api import NullRecorder, Objective
from harness.errors import HarnessError
from harness.orchestration.plan import build_spec
from harness.quant.linear import PackedLinear
from harness.registry import build_method
from harness.train import trainer
from harness.train.config import TrainConfig
from harness.train.losses import get_loss
from methods.bitnet import (
    PhasedQuantLinear,
    absmax_per_token,
    phase_in,
    quant_lambda,
    warmup_steps,
)
from methods.weightquant import to_quant_linears


def _method(**over):
    return build_method(build_spec("tiny-llama", "bitnet", over, "quick"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tok, n=2, seq=24, seed=0):
    return torch.randint(0, tok.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_config_is_ternary_and_checked():
    cfg = _method().config
    assert (cfg.fmt, cfg.bits, cfg.scaling, cfg.clip, cfg.act_bits) == \
        ("ternary", 2, "absmean", False, None)
    assert warmup_steps(cfg) == cfg.train.steps // 2
    assert warmup_steps(_method(warmup_quant_steps=0).config) == 0
    assert _method(group_size=-1).config.qformat().group_size == -1
    for over, words in [({"fmt": "int"}, "fmt=ternary"), ({"bits": 3}, "drop --bits"),
                        ({"clip": True}, "drop clip"),
                        ({"warmup_quant_steps": 10**6}, "warmup_quant_steps <= train.steps")]:
        with pytest.raises(HarnessError, match=words):
            _method(**over)


def test_lambda_schedule():
    assert [quant_lambda(k, 4) for k in range(7)] == [0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert quant_lambda(0, 0) == quant_lambda(5, 0) == 1.0


@pytest.mark.parametrize("group_size", [-1, 32])
def test_lambda_zero_is_fp_and_one_is_ternary(tiny, group_size):
    model, tok = tiny
    ids = _ids(tok)
    method = _method(group_size=group_size, act_bits=8)
    phased = method.prepare(copy.deepcopy(model), None)
    assert any(isinstance(m, PhasedQuantLinear) for m in phased.modules())
    method.phase.value = 0.0
    assert torch.equal(_logits(phased, ids), _logits(model, ids))
    # lambda = 1: the weights of the plain ternary training form (what rtn/qat build), and
    # the inputs on the 8-bit grid
    method.phase.value = 1.0
    ternary = to_quant_linears(copy.deepcopy(model), method.config)
    plain = _logits(ternary, ids)
    no_act = build_method(build_spec("tiny-llama", "bitnet", {"group_size": group_size},
                                     "quick"))
    weights_only = no_act.prepare(copy.deepcopy(model), None)
    assert torch.equal(_logits(weights_only, ids), plain)
    with_act = _logits(phased, ids)
    assert not torch.equal(with_act, plain)
    # packing keeps lambda = 1 and the activation hooks: the stored model's logits
    packed = method.finalize(phased, None)
    assert all(not isinstance(m, PhasedQuantLinear) for m in packed.modules())
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    torch.testing.assert_close(_logits(packed, ids), with_act)


def test_phase_in_mixes_with_a_straight_through_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    q = (x.detach() * 2) + (x - x.detach())  # a stand-in quantizer with its own STE
    out = phase_in(x, q, 0.25)
    torch.testing.assert_close(out, x.detach() * 1.25)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert phase_in(x, q, 0.0) is x and phase_in(x, q, 1.0) is q


def test_absmax_per_token_grid_and_gradient():
    x = torch.randn(2, 5, 16) * torch.rand(2, 5, 1) * 10
    x.requires_grad_(True)
    q = absmax_per_token(x, 8)
    scale = 127 / x.detach().abs().amax(-1, keepdim=True)
    codes = q.detach() * scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.abs().max() <= 127 + 1e-3
    # the token's largest magnitude is a grid point, every other value within half a step
    torch.testing.assert_close(q.detach().abs().amax(-1), x.detach().abs().amax(-1))
    assert ((q.detach() - x.detach()).abs() <= 0.5 / scale + 1e-6).all()
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_weight_gradient_is_straight_through(tiny):
    model, tok = tiny
    method = _method(group_size=-1)
    phased = method.prepare(copy.deepcopy(model), None)
    layer = next(m for m in phased.modules() if isinstance(m, PhasedQuantLinear))
    method.phase.value = 0.5
    w = layer.dequantized_weight()
    w.sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones_like(layer.weight))


def test_objective_sets_lambda_from_the_step():
    method = _method(warmup_quant_steps=4)
    objective = method.objective(None)
    assert method.phase.value == 0.0 and objective.loss is not None
    objective.on_step(3)
    assert method.phase.value == 0.75
    objective.on_step(9)
    assert method.phase.value == 1.0


def test_trainer_calls_on_step_before_each_step_and_from_the_resumed_step(tiny, tmp_path):
    model, _ = tiny
    model = copy.deepcopy(model)
    data = torch.randint(0, 500, (8, 16), generator=torch.Generator().manual_seed(0))
    ctx = SimpleNamespace(device=torch.device("cpu"), recorder=NullRecorder(), run_dir=tmp_path,
                          spec=SimpleNamespace(method="bitnet"), teacher=None,
                          train_batches=lambda source: data)
    seen = []
    ce = get_loss("ce")
    objective = Objective(loss=lambda inputs: ce(inputs), on_step=seen.append)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, checkpoint_every=1, log_every=1)
    trainer.train(model, objective, cfg, ctx, progress=False)
    assert seen == [0, 1]
    seen.clear()
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, checkpoint_every=1, log_every=1)
    trainer.train(model, objective, cfg, ctx, progress=False)
    assert seen == [2]  # resumed from the checkpoint of step 2


def test_cli_run_stores_ppl_and_bits(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    code, _, err = cli("run", "--methods", "bitnet", "--model", "tiny-llama", "--set",
                       "train.steps=2", "--set", "train.seq_len=32", "--set", "data=corpus",
                       "--set", "act_bits=8", "--no-fp", "--tasks", "", "--max-eval-tokens",
                       "1024", "--seq-len", "128", "--db", db, "--output-dir", tmp_path / "runs")
    assert code == 0, err
    code, out, _ = cli("list", "--json", "--db", db)
    (run,) = json.loads(out)
    assert run["method"] == "bitnet" and run["status"] == "finished"
    assert run["metrics"]["ppl"] > 0
    # 1.6 bits per trit plus fp16 scales
    assert 1.6 <= run["metrics"]["bits_per_weight"] < 2.5
