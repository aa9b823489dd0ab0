"""``init=``: the trained methods start from any post-training method's weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from harness.api import Calibration, NullRecorder, RunContext
from harness.errors import HarnessError
from harness.orchestration.plan import build_spec
from harness.quant.linear import QuantLinear
from harness.registry import build_method, get_method
from methods.init import starting_methods

FMT = {"bits": 3, "group_size": 32, "fmt": "int", "calib_samples": 8, "calib_seq_len": 32,
       "clip_tokens": 32, "clip_grid": 4}


def _method(name, **over):
    return build_method(build_spec("tiny-llama", name, over, "quick"))


def _alone(name):
    """The start method run by itself, on the settings of FMT it has."""
    fields = get_method(name).Config.model_fields
    return _method(name, **{k: v for k, v in FMT.items() if k in fields})


def _ctx(tok):
    gen = torch.Generator().manual_seed(0)
    batches = torch.randint(0, tok.vocab_size, (8, 32), generator=gen)
    spec = type("Spec", (), {"seed": 0})()
    return RunContext(spec=spec, device=torch.device("cpu"), tokenizer=tok,
                      recorder=NullRecorder(), run_dir=None, calibration=lambda: batches)


def _state(model) -> dict[str, torch.Tensor]:
    """What the training form computes with: the fake-quantized weights and every other
    parameter (AWQ folds its scales into the norms)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.dequantized_weight().detach().clone()
    for name, p in model.named_parameters():
        if "layernorm" in name or name.endswith("norm.weight"):
            out[name] = p.detach().clone()
    return out


def test_clip_and_rtn_starts_keep_the_old_run_keys():
    key = lambda over: build_spec("tiny-llama", "qat", over, "quick").run_key  # noqa: E731
    assert key({"init": "clip"}) == key({})
    assert key({"init": "rtn"}) == key({"clip": False}) != key({})
    assert key({"init": "gptq"}) not in (key({}), key({"clip": False}))
    assert key({"init": "gptq", "init_params": {"act_order": True}}) != key({"init": "gptq"})


def test_starts_offered_are_the_post_training_grid_methods():
    assert {"rtn", "clip", "gptq", "awq", "hqq"} <= set(starting_methods())
    assert not {"fp", "onebit", "qat", "bitdistiller", "bitnet"} & set(starting_methods())


@pytest.mark.parametrize("trained", ["qat", "bitdistiller"])
@pytest.mark.parametrize("start", ["rtn", "clip", "gptq", "awq"])
def test_trained_method_starts_where_the_start_method_ends(tiny_copy, trained, start):
    model, tok = tiny_copy
    twin = copy.deepcopy(model)
    begun = _method(trained, init=start, **FMT).prepare(model, _ctx(tok))
    alone = _alone(start).prepare(twin, _ctx(tok))
    got, want = _state(begun), _state(alone)
    assert got.keys() == want.keys() and any(isinstance(m, QuantLinear) for m in begun.modules())
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_starts_differ_from_each_other(tiny_copy):
    # a start that fell back to the pretrained weights would equal rtn's
    model, tok = tiny_copy
    states = {s: _state(_method("qat", init=s, **FMT).prepare(copy.deepcopy(model), _ctx(tok)))
              for s in ("rtn", "gptq", "awq")}
    for s in ("gptq", "awq"):
        assert any(not torch.equal(states[s][k], states["rtn"][k]) for k in states["rtn"]), s


@pytest.mark.parametrize("fmt", ["intfz", "int"])
def test_hqq_start_keeps_hqqs_scales_and_zeros(tiny_copy, fmt):
    # HQQ alone stores its own codes; as a start, the training form's min/max quantizer must
    # find HQQ's scales and zeros again, every code kept but each group's two ends
    from harness.quant.hqq import hqq_quantize

    model, tok = tiny_copy
    twin = copy.deepcopy(model)
    begun = _method("qat", init="hqq", **{**FMT, "fmt": fmt}).prepare(model, _ctx(tok))
    layers = dict(begun.named_modules())
    checked = 0
    for name, m in twin.named_modules():
        if not isinstance(layers.get(name), QuantLinear):
            continue
        ref = hqq_quantize(m.weight.detach(), layers[name].qformat).qparams
        got = layers[name].qformat.format().quantize(layers[name].weight.detach())
        assert torch.equal(got.scales, ref.scales) and torch.equal(got.zeros, ref.zeros), name
        moved = (got.codes != ref.codes).reshape(got.codes.shape[0], -1, 32).sum(-1)
        assert int(moved.max()) <= 2, name
        checked += 1
    assert checked


def test_needs_follow_the_start():
    assert _method("qat", init="gptq", **FMT).needs().calibration == Calibration(8, 32)
    assert _method("qat", init="rtn", **FMT).needs().calibration is None
    assert _method("qat", init="hqq", **FMT).needs().calibration is None
    bd = _method("bitdistiller", init="gptq", **FMT).needs()
    assert bd.teacher_model and bd.teacher_data is not None


def test_init_params_reach_the_start():
    m = _method("qat", init="gptq", init_params={"act_order": True, "damp": 0.1}, **FMT)
    assert m.start.config.act_order and m.start.config.damp == 0.1
    assert m.start.config.bits == 3 and m.start.config.group_size == 32
    assert m.start.config.calib_samples == 8


@pytest.mark.parametrize(("over", "needle"), [
    ({"init": "onebit"}, "onebit has no weight grid"),
    ({"init": "fp"}, "fp has no weight grid"),
    ({"init": "bitdistiller"}, "use one of"),
    ({"init": "gptqq"}, "no such method"),
    ({"init": "gptq", "clip": True}, "drop clip"),
    ({"init": "rtn", "clip": True}, "init=rtn is clip=false"),
    ({"init": "clip", "init_params": {"x": 1}}, "drop init_params"),
    ({"init": "gptq", "init_params": {"nope": 1}}, "unknown key 'nope'"),
    ({"init": "hqq", "fmt": "nf3"}, "init=hqq refuses"),
])
def test_bad_init_is_one_line(over, needle):
    with pytest.raises(HarnessError, match=needle) as exc:
        _method("qat", **{"bits": 3, **over})
    assert "\n" not in str(exc.value)


def _cli_run(cli, tmp_path, *sets):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["run", "--methods", "bitdistiller", "--bits", "2", "--model", "tiny-llama",
            "--max-eval-tokens", "512", "--seq-len", "128", "--tasks", "", "--no-fp",
            "--db", db, "--output-dir", tmp_path / "runs", "--set", "train.steps=2",
            "--set", "train.seq_len=32", "--set", "train.batch_size=1", "--set", "data=corpus",
            "--set", "calib_samples=8", "--set", "calib_seq_len=32"]
    for s in sets:
        args += ["--set", s]
    code, out, err = cli(*args)
    _, listed, _ = cli("list", "--json", "--db", db)
    return code, err, json.loads(listed) if listed.strip() else []


def test_cli_bitdistiller_from_gptq(cli, tmp_path):
    code, err, runs = _cli_run(cli, tmp_path, "init=gptq", "init_params.act_order=true")
    assert code == 0, err
    (run,) = runs
    assert run["status"] == "finished" and run["metrics"]["ppl"] > 0
    config = run["spec"]["config"]
    assert config["init"] == "gptq" and config["init_params"] == {"act_order": True}


@pytest.mark.parametrize("bad", ["init=onebit", "init=nope"])
def test_cli_bad_init_exits_2_without_a_run(cli, tmp_path, bad):
    code, err, runs = _cli_run(cli, tmp_path, bad)
    assert code == 2 and runs == []
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and "init=" in lines[0]
