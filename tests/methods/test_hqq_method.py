"""The hqq method: intfz (fractional fp16 zeros) by default, int asym as the int-storage
variant, refusals in one line; and `harness run` with fmt=intfz end to end on tiny-llama."""

from __future__ import annotations

import json

import pytest
import torch

from harness.api import NullRecorder, RunContext
from harness.orchestration.plan import build_spec
from harness.quant.linear import PackedLinear
from harness.registry import build_method

QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "1024", "--seq-len", "128", "--tasks", "",
         "--no-fp"]


def _method(**over):
    return build_method(build_spec("tiny-llama", "hqq", over, "quick"))


def test_config_defaults_follow_the_reference():
    cfg = _method().config
    assert cfg.fmt == "intfz" and not cfg.symmetric
    assert (cfg.lp_norm, cfg.beta, cfg.kappa, cfg.iters, cfg.round_zero) == (0.7, 10.0, 1.0, 20,
                                                                              None)
    assert _method(fmt="int").config.fmt == "int"
    assert _method(bits=4).config.fmt == "intfz"


@pytest.mark.parametrize("over", [dict(fmt="nf3"), dict(symmetric=True),
                                  dict(fmt="int", symmetric=True), dict(fmt="ternary")])
def test_other_formats_refused(over):
    with pytest.raises(Exception, match="hqq needs fmt=intfz"):
        _method(**over)


class _Stats(NullRecorder):
    def __init__(self):
        super().__init__()
        self.stats = {}

    def layer_stat(self, layer, module, stat, value):
        self.stats[(layer, module, stat)] = value


@pytest.mark.parametrize("fmt", ["intfz", "int"])
def test_prepare_stores_what_it_computed(tiny_copy, fmt):
    model, tok = tiny_copy
    rec = _Stats()
    ctx = RunContext(spec=type("Spec", (), {"seed": 0})(), device=torch.device("cpu"),
                     tokenizer=tok, recorder=rec, run_dir=None, calibration=None)
    model = _method(fmt=fmt, bits=3, group_size=32).prepare(model, ctx)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.format.name == fmt for m in layers)
    zeros = layers[0].q_zeros
    assert zeros.dtype == (torch.float16 if fmt == "intfz" else torch.uint8)
    names = {s for (_, _, s) in rec.stats}
    assert names == {"rtn_weight_mse", "rtn_fz_weight_mse", "hqq_weight_mse",
                     "hqq_frac_zero_weight_mse"}
    if fmt == "intfz":  # stored = fractional, and it beats int RTN on the whole
        hqq = sum(v for (_, _, s), v in rec.stats.items() if s == "hqq_weight_mse")
        rtn = sum(v for (_, _, s), v in rec.stats.items() if s == "rtn_weight_mse")
        assert hqq < rtn


def _runs(cli, db):
    code, listed, err = cli("list", "--json", "--db", db)
    assert code == 0, err
    out = {}
    for r in json.loads(listed):
        r["config"] = json.loads(cli("show", r["run_key"], "--json", "--db", db)[1])["spec"]["config"]
        out[(r["method"], r["config"]["fmt"])] = r
    return out


def test_cli_rtn_and_hqq_on_intfz(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    code, _, err = cli("run", "--methods", "rtn", "--set", "fmt=intfz", "--bits", "3", *QUICK,
                       "--db", db, "--output-dir", tmp_path / "runs")
    assert code == 0, err
    code, _, err = cli("run", "--methods", "hqq", "--bits", "3", *QUICK, "--db", db,
                       "--output-dir", tmp_path / "runs")
    assert code == 0, err
    runs = _runs(cli, db)
    assert set(runs) == {("rtn", "intfz"), ("hqq", "intfz")}
    for r in runs.values():
        assert r["status"] == "finished" and r["metrics"]["ppl"] > 0
        g = r["config"]["group_size"]
        # codes at 3 bits + fp16 scale + fp16 zero per group, measured from the packed tensors
        assert r["metrics"]["bits_per_weight"] == pytest.approx(3 + 32 / g, rel=1e-3)


@pytest.mark.parametrize("args,needle", [
    (["--set", "fmt=nf3"], "hqq needs fmt=intfz"),
    (["--set", "symmetric=true"], "hqq needs fmt=intfz"),
    (["--set", "fmt=int", "--set", "symmetric=true"], "hqq needs fmt=intfz"),
])
def test_bad_hqq_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    code, _, err = cli("run", "--methods", "hqq", "--bits", "3", *args, *QUICK,
                       "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2, err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
