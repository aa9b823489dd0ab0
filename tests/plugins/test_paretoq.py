"""The out-of-tree ParetoQ plugin (plugins/paretoq, installed by `make setup`).

It proves the plugin route: the method and its formats arrive through the entry-point groups
``harness.methods`` and ``harness.formats`` and nothing in ``harness/`` or ``methods/`` names
them. The math is checked against the reference (facebookresearch/ParetoQ
``models/utils_quant.py``) with levels and gradients worked out by hand here, never by calling
the plugin's own helpers for the expected values.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "256", "--seq-len", "128", "--tasks", "",
         "--no-fp"]
TRAIN = ["--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "train.batch_size=1"]


def _fmt(name: str, bits: int = 2, group_size: int = -1):
    from harness.quant.formats import get_format

    return get_format(name, bits, group_size)


def _g(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- found through entry points, named nowhere in the core ----------------------------------

def test_method_and_formats_come_from_the_plugins_entry_points():
    methods = {ep.name: ep for ep in entry_points(group="harness.methods")}
    formats = {ep.name: ep for ep in entry_points(group="harness.formats")}
    assert methods["paretoq"].dist.name == "harness-paretoq"
    assert methods["paretoq"].value == "harness_paretoq.method:ParetoQ"
    for name, cls in (("seq", "SEQFormat"), ("seq_ternary", "SEQTernaryFormat"),
                      ("lsq", "LSQFormat")):
        assert formats[name].dist.name == "harness-paretoq"
        assert formats[name].value == f"harness_paretoq.formats:{cls}"

    from harness.quant.formats import FORMATS, format_class
    from harness.registry import get_method

    assert get_method("paretoq").__module__ == "harness_paretoq.method"
    assert {"seq", "seq_ternary", "lsq"} <= set(FORMATS.names())
    assert format_class("seq").__module__ == "harness_paretoq.formats"


def test_the_core_names_paretoq_nowhere():
    """`grep -ri paretoq harness/ methods/ pyproject.toml` finds nothing."""
    hits = []
    for top in ("harness", "methods"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                text = path.read_text(errors="ignore").lower()
                hits += [str(path) for word in ("paretoq", "seq_ternary") if word in text]
    assert "paretoq" not in (ROOT / "pyproject.toml").read_text().lower()
    assert hits == []


def test_a_plugin_cannot_shadow_a_builtin_format(monkeypatch):
    """An entry point or a decorated class claiming int (direct) or ternary (lazy) is refused."""
    from harness import registry
    from harness.quant.formats import FORMATS, Format, register_format

    real = registry.entry_points
    for name in ("int", "ternary"):
        fake = EntryPoint(name, "evil_plugin:Fmt", "harness.formats")
        monkeypatch.setattr(registry, "entry_points",
                            lambda group, fake=fake: [*real(group=group), fake])
        monkeypatch.setattr(FORMATS, "_plugins_loaded", False)
        with pytest.raises(HarnessError, match=f"format '{name}' is declared twice"):
            FORMATS.get("seq")
    monkeypatch.undo()
    for name in ("int", "ternary", "seq"):
        with pytest.raises(HarnessError, match="declared twice"):
            register_format(name)(type("Evil", (Format,), {}))
    assert FORMATS.get("int").__module__ == "harness.quant.formats"
    assert FORMATS.get("ternary").__module__ == "harness.quant.ternary"


# --- grids, by hand ------------------------------------------------------------------------

def test_seq_2bit_levels():
    """(round(clip(x, -0.99, 0.99) * 2 - 1/2) + 1/2) / 2: {-0.75, -0.25, 0.25, 0.75} alpha."""
    x = [-1.0, -0.6, -0.3, -0.01, 0.01, 0.3, 0.6, 1.0]
    want = [-0.75, -0.75, -0.25, -0.25, 0.25, 0.25, 0.75, 0.75]
    w, alpha = _g(x, [2 * v for v in x]), _g([1.0], [2.0])
    out = _fmt("seq").fake_quantize_scaled(w, alpha)
    assert out.tolist() == [want, [2 * v for v in want]]


def test_seq_ternary_levels():
    """round(clip(x, -0.99, 0.99) * 1.5) / 1.5: {-2/3, 0, 2/3} alpha."""
    x = [-1.0, -0.4, -0.3, 0.3, 0.34, 1.0]
    out = _fmt("seq_ternary").fake_quantize_scaled(_g(x), _g([1.0]))
    t = torch.tensor(1.0) / torch.tensor(1.5)
    assert out.tolist() == [[-t.item(), -t.item(), 0.0, 0.0, t.item(), t.item()]]


def test_lsq_1bit_is_sign_times_mean_abs():
    w = _g([0.5, -1.5, 0.0, 2.0], [-0.25, 0.25, -0.25, 0.75])
    f = _fmt("lsq", 1)
    alpha = f.init_scales(w)
    assert alpha.tolist() == [[1.0], [0.375]]
    assert f.fake_quantize_scaled(w, alpha).tolist() == [[1.0, -1.0, 1.0, 1.0],
                                                         [-0.375, 0.375, -0.375, 0.375]]


def test_lsq_3bit_levels_round_half_to_even_as_the_reference():
    """clamp(round(x), -4, 3) with torch.round (2.5 -> 2); alpha init max|W| / Qp (LSQ),
    max|W| (SEQ)."""
    x = [-10.0, -4.4, -2.6, -0.4, 0.6, 2.5, 3.4, 9.0]
    out = _fmt("lsq", 3).fake_quantize_scaled(_g(x), _g([1.0]))
    assert out.tolist() == [[-4.0, -4.0, -3.0, 0.0, 1.0, 2.0, 3.0, 3.0]]
    assert _fmt("lsq", 3).init_scales(_g(x)).tolist() == [[pytest.approx(10.0 / 3.0)]]
    assert _fmt("lsq", 4).init_scales(_g(x)).tolist() == [[pytest.approx(10.0 / 7.0)]]
    assert _fmt("seq").init_scales(_g(x)).tolist() == [[10.0]]


def test_groups_each_get_their_own_alpha():
    w = _g([0.9, -0.1, 4.0, -1.2])
    out = _fmt("seq", group_size=2).fake_quantize_scaled(w, _g([1.0, 4.0]))
    assert out.tolist() == [[0.75, -0.25, 3.0, -1.0]]


# --- gradients, by hand (reference backward, layerwise=False) --------------------------------

#: (format, bits, row of W with alpha = 1, d level/d alpha per weight, W-gradient mask, Qp)
GRADS = {
    # x < -0.99: Qn = -0.75; inside: level - x; x > 0.99: Qp = 0.75
    "seq": ("seq", 2, [-1.2, -0.3, 0.2, 0.9], [-0.75, 0.05, 0.05, -0.15], [0, 1, 1, 1], 1),
    # ternary: Qn, Qp = -1, 1 (the reference's (n - shift) / n with n = 1.5, shift = 0)
    "seq_ternary": ("seq_ternary", 2, [-1.2, -0.3, 0.5, 0.9],
                    [-1.0, 0.3, 2 / 3 - 0.5, 2 / 3 - 0.9], [0, 1, 1, 1], 1),
    # 1 bit: sign(x) everywhere; W's gradient only where |x| <= 1
    "lsq1": ("lsq", 1, [-1.5, -0.5, 0.25, 2.0], [-1.0, -1.0, 1.0, 1.0], [0, 1, 1, 0], 1),
    # 3 bits: Qn = -4 below, Qp = 3 above, round(x) - x inside
    "lsq3": ("lsq", 3, [-5.0, -1.3, 0.4, 3.6], [-4.0, 0.3, -0.4, 3.0], [0, 1, 1, 0], 3),
}


@pytest.mark.parametrize("case", sorted(GRADS))
def test_gradients_match_the_reference_backward(case):
    name, bits, row, factor, mask, qp = GRADS[case]
    # two rows: the second is the first at twice the scale, so x = W / alpha is the same
    w = _g(row, [2 * v for v in row]).requires_grad_()
    alpha = _g([1.0], [2.0]).requires_grad_()
    g = _g([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    (_fmt(name, bits).fake_quantize_scaled(w, alpha) * g).sum().backward()
    scale = 1 / math.sqrt(8 * qp)  # grad_scale = 1 / sqrt(numel(W) * Qp)
    want_alpha = sum(f * gi for f, gi in zip(factor, [1, 2, 3, 4], strict=True)) * scale
    assert alpha.grad.flatten().tolist() == pytest.approx([want_alpha, want_alpha], abs=1e-6)
    want_w = [m * gi for m, gi in zip(mask, [1.0, 2.0, 3.0, 4.0], strict=True)]
    assert w.grad.tolist() == [want_w, want_w]


def test_alpha_is_rounded_to_fp16_in_the_forward_with_its_gradient_straight_through():
    a = 1.0 + 2 ** -13  # between two fp16 values: stored as 1.0
    w = _g([0.9]).requires_grad_()
    alpha = _g([a]).requires_grad_()
    out = _fmt("seq").fake_quantize_scaled(w, alpha)
    assert out.item() == 0.75  # 0.75 * fp16(alpha) = 0.75 * 1.0
    out.backward()
    assert alpha.grad.item() == pytest.approx(0.75 - 0.9)  # level - x, x = 0.9 / 1.0


# --- storage ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,bits,group,code_bits", [
    ("seq", 2, -1, 2), ("seq_ternary", 2, -1, 1.6), ("lsq", 1, -1, 1), ("lsq", 3, -1, 3),
    ("lsq", 4, 16, 4)])
def test_packed_layer_equals_the_trained_forward(fmt, bits, group, code_bits):
    from harness_paretoq.linear import ParetoQLinear

    from harness.quant.formats import QuantFormat
    from harness.quant.linear import PackedLinear

    torch.manual_seed(0)
    linear = nn.Linear(48, 10)
    qformat = QuantFormat(fmt=fmt, bits=bits, group_size=group)
    m = ParetoQLinear.from_linear(linear, qformat)
    assert m.alpha.requires_grad and m.alpha.shape == (10, 1 if group == -1 else 48 // group)
    with torch.no_grad():  # as after training: alpha moved off its init, off the fp16 grid
        m.alpha.mul_(1 + 0.3 * torch.rand_like(m.alpha))
    x = torch.randn(3, 48)
    trained_w, trained_y = m.dequantized_weight().detach(), m(x).detach()

    packed = m.to_packed()
    assert isinstance(packed, PackedLinear)
    assert torch.equal(packed.dequantized_weight(), trained_w)
    assert torch.equal(packed(x), trained_y)
    ng = 1 if group == -1 else 48 // group
    codes = math.ceil(480 / 5) if fmt == "seq_ternary" else 480 * code_bits // 8
    assert packed.packed_nbytes() == codes + 10 * ng * 2 + 10 * 2  # codes, fp16 alpha, bias
    assert torch.equal(packed.q_scales, m.alpha.detach().half())

    # read back from its spec, as a packed file is: the format comes from its entry point
    empty = PackedLinear.from_packed_spec(packed.packed_spec())
    empty.load_state_dict(packed.state_dict())
    assert torch.equal(empty.dequantized_weight(), trained_w)

    m.pack()  # in place, as finalize does: alpha leaves with the latent weight
    assert isinstance(m, PackedLinear) and not any(True for _ in m.parameters(recurse=False)
                                                   if _.requires_grad)
    assert "alpha" not in m.state_dict() and torch.equal(m.dequantized_weight(), trained_w)


def test_the_format_protocol_alone_round_trips():
    """Without a learned alpha (e.g. --methods rtn --set fmt=seq): pack(w) == fake_quantize(w)."""
    w = torch.randn(6, 32)
    for name, bits in (("seq", 2), ("seq_ternary", 2), ("lsq", 1), ("lsq", 4)):
        f = _fmt(name, bits, 16)
        assert torch.equal(f.pack(w).dequantize(), f.fake_quantize(w, scale_dtype=torch.float16))


# --- the method, through the CLI -------------------------------------------------------------

def test_config_follows_bits_and_the_reference_training():
    from harness.registry import get_method

    config = get_method("paretoq").Config
    assert [config(bits=b).fmt for b in (1, 2, 3, 4)] == ["lsq", "seq", "lsq", "lsq"]
    ternary = config(fmt="seq_ternary")
    assert ternary.bits == 2 and ternary.qformat().format().nominal_bits == 1.58
    c = config()
    assert (c.train.lr, c.train.schedule, c.train.weight_decay, c.train.warmup_steps) == (
        2e-5, "cosine", 0.0, 0)
    assert (c.loss, c.data, c.clip) == ("ce", "corpus", False)
    assert config(loss="cakld").loss == "cakld"


def test_cli_run_trains_packs_and_stores_bits_per_weight(cli, tmp_path, tiny):
    """`harness run --methods rtn,paretoq --bits 2 --set fmt=seq`: the plugin's method, and its
    format under a core method, each stored with the bits/weight measured from packed tensors."""
    db = f"sqlite:///{tmp_path / 'x.db'}"
    code, _, err = cli("run", "--methods", "rtn,paretoq", "--bits", "2", "--set", "fmt=seq",
                       "--group-size", "-1", *QUICK, *TRAIN, "--db", db,
                       "--output-dir", tmp_path / "runs")
    assert code == 0, err
    code, out, _ = cli("list", "--json", "--db", db)
    runs = {r["method"]: r for r in json.loads(out)}
    assert set(runs) == {"rtn", "paretoq"}
    from harness.quant.modules import decoder_linear_names

    model = tiny[0]
    shapes = [model.get_submodule(n).weight.shape for n in decoder_linear_names(model)]
    n_weights = sum(o * i for o, i in shapes)
    want = (2 * n_weights + 16 * sum(o for o, _ in shapes)) / n_weights  # codes + fp16 alpha
    for run in runs.values():
        assert run["status"] == "finished" and run["fmt"] == "seq" and run["bits"] == 2
        assert run["metrics"]["bits_per_weight"] == pytest.approx(want)
    spec = runs["paretoq"]["spec"]["config"]
    assert spec["fmt"] == "seq" and spec["train"]["lr"] == 2e-5 and spec["clip"] is False


BAD = [
    (["--methods", "paretoq", "--bits", "5"], "paretoq quantizes to 1-4 bits"),
    (["--methods", "paretoq", "--set", "fmt=seq", "--bits", "3"], "seq is ParetoQ's 2-bit grid"),
    (["--methods", "paretoq", "--set", "fmt=lsq", "--bits", "2"], "lsq takes 1, 3 or 4 bits"),
    (["--methods", "paretoq", "--set", "fmt=seq_ternary", "--bits", "3"],
     "seq_ternary is fixed at 1.58 bits"),
    (["--methods", "paretoq", "--set", "fmt=int"], "paretoq quantizes to fmt=seq"),
    (["--methods", "paretoq", "--set", "clip=true"], "paretoq has no clipping"),
    (["--methods", "rtn", "--set", "fmt=seq", "--bits", "5"], "seq is ParetoQ's 2-bit grid"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_error_line_exit_2_and_no_run_row(cli, tmp_path, argv, needle):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    code, _, err = cli("run", *argv, *QUICK, "--db", db, "--output-dir", tmp_path / "runs")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and needle in errors[0], err
    if (tmp_path / "x.db").exists():
        from harness.store import Store

        assert Store(db, readonly=True).runs() == []

