"""The gptq and hqq methods: configs, declared needs and a CLI run on tiny-llama."""

from __future__ import annotations

import pytest
import torch

from harness.api import Calibration, NullRecorder, RunContext
from harness.orchestration.plan import build_spec
from harness.quant.linear import PackedLinear, QuantLinear
from harness.registry import build_method


def _method(name, **over):
    return build_method(build_spec("tiny-llama", name, over, "quick"))


def test_configs_and_needs():
    gptq = _method("gptq")
    assert gptq.config.fmt == "int" and not gptq.config.act_order
    assert gptq.config.block_size == 128 and gptq.config.damp == 0.01
    assert gptq.needs().calibration == Calibration()
    assert _method("gptq", calib_samples=4, calib_seq_len=64).needs().calibration == \
        Calibration(4, 64)
    assert _method("gptq", fmt="nf3").config.fmt == "nf3"
    assert _method("hqq").config.fmt == "intfz" and _method("hqq").needs().calibration is None
    with pytest.raises(Exception, match="hqq needs fmt=int"):
        _method("hqq", fmt="nf3")


def _ctx(tok, samples=2, seq=32):
    gen = torch.Generator().manual_seed(0)
    batches = torch.randint(0, tok.vocab_size, (samples, seq), generator=gen)
    spec = type("Spec", (), {"seed": 0})()
    return RunContext(spec=spec, device=torch.device("cpu"), tokenizer=tok,
                      recorder=NullRecorder(), run_dir=None, calibration=lambda: batches)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_prepare_stores_what_it_computed(tiny_copy, act_order):
    model, tok = tiny_copy
    method = _method("gptq", bits=3, group_size=32, act_order=act_order)
    model = method.prepare(model, _ctx(tok))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers
    for m in layers:  # the latent weight is W_q itself: fake quant and packing give it back
        q = m.dequantized_weight()
        assert torch.equal(q, m.weight.float())
        assert torch.equal(m.packed_tensor().dequantize(), q)
    method.finalize(model, None)


def test_hqq_prepare_builds_packed_layers(tiny_copy):
    model, tok = tiny_copy
    model = _method("hqq", bits=3, group_size=32).prepare(model, _ctx(tok))
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_cli_run_stores_a_ppl(run_quick):
    runs = run_quick("gptq,hqq")
    assert set(runs) == {"gptq", "hqq"}
    for r in runs.values():
        assert r["status"] == "finished" and r["metrics"]["ppl"] > 0
