"""Ternary format (BitNet b1.58): grid, packing 5 trits per byte, packed = fake-quantized."""

import copy

import pytest
import torch

from harness.errors import HarnessError
from harness.quant import (
    FORMATS,
    PackedLinear,
    QuantFormat,
    QuantLinear,
    decoder_linear_names,
    dequantize,
    fake_quantize,
    get_format,
    pack,
    quantize,
    replace_linears,
)
from harness.quant.formats import packed_from_tensors
from harness.quant.modules import quantized_modules
from harness.quant.ternary import TernaryFormat, pack_trits, unpack_trits

SCALINGS = ["absmean", "absmax"]


def _reference(w: torch.Tensor, group: int, scaling: str) -> torch.Tensor:
    """BitNet b1.58 written out: s = mean|W| (or max|W|) per group, RoundClip(W / s, -1, 1) * s,
    with the scale stored in fp16 and rounding half away from zero."""
    out_f, in_f = w.shape
    g = in_f if group == -1 else group
    x = w.float().reshape(out_f, in_f // g, g)
    mag = x.abs().mean(-1, keepdim=True) if scaling == "absmean" else x.abs().amax(-1, keepdim=True)
    s = mag.clamp(min=1e-5).half().float()
    v = x / s
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-1, 1)
    return (q * s).reshape(w.shape)


def test_registered_and_lazy():
    assert "ternary" in FORMATS.names()
    f = get_format("ternary", group_size=64)
    assert isinstance(f, TernaryFormat) and f.scaling == "absmean" and f.kernel is None
    assert f.spec() == QuantFormat(fmt="ternary", group_size=64, scaling="absmean")
    assert f.spec().format() == f


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("group", [16, 64, -1])
def test_quantize_dequantize_round_trip(scaling, group):
    torch.manual_seed(0)
    w = torch.randn(24, 128) * 0.05
    f = get_format("ternary", group_size=group, scaling=scaling)
    q = f.quantize(w)
    assert set(q.codes.unique().tolist()) <= {0, 1, 2} and q.zeros is None
    expected = f.fake_quantize(w, scale_dtype=torch.float16)
    assert torch.equal(f.dequantize(q), expected)
    assert torch.equal(dequantize(quantize(w, f)), expected)  # the old entry points dispatch
    assert torch.equal(expected, _reference(w, group, scaling))
    levels = (expected.reshape(24, -1, 128 if group == -1 else group)
              / q.scales.float().unsqueeze(-1)).unique()
    assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}


def test_absmax_thresholds_at_half():
    w = torch.tensor([[1.0, 0.5, 0.49, -0.5, -0.49, 0.0, -1.0, 0.2]])
    out = fake_quantize(w, get_format("ternary", group_size=-1, scaling="absmax"))
    assert out.tolist() == [[1.0, 1.0, 0.0, -1.0, 0.0, 0.0, -1.0, 0.0]]


@pytest.mark.parametrize("n", [1, 4, 5, 6, 9, 10, 123, 1000])
def test_pack_unpack_trits_with_tail(n):
    codes = torch.randint(0, 3, (n,), dtype=torch.uint8)
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 5)
    assert int(packed.max()) <= 242  # 3^5 - 1
    assert torch.equal(unpack_trits(packed, n), codes)


def test_all_243_bytes_decode():
    codes = torch.tensor([(b // 3**i) % 3 for b in range(243) for i in range(5)], dtype=torch.uint8)
    assert torch.equal(pack_trits(codes), torch.arange(243, dtype=torch.uint8))


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("shape,group", [((8, 64), 16), ((3, 35), -1), ((7, 33), 11)])
def test_packed_tensor_round_trip_and_measured_bytes(scaling, shape, group):
    torch.manual_seed(1)
    w = torch.randn(*shape)
    f = get_format("ternary", group_size=group, scaling=scaling)
    p = pack(w, f)
    assert torch.equal(p.dequantize(), fake_quantize(w, f, scale_dtype=torch.float16))
    again = packed_from_tensors(p.tensors(), p.meta())  # the format rebuilt from the metadata
    assert torch.equal(again.dequantize(), p.dequantize())
    n = shape[0] * shape[1]
    n_groups = 1 if group == -1 else shape[1] // group
    assert set(p.tensors()) == {"codes", "scales"}
    assert p.nbytes == -(-n // 5) + shape[0] * n_groups * 2  # codes + fp16 scales


def test_straight_through_gradient():
    w = (torch.randn(4, 32) * 0.1).requires_grad_()
    g = torch.randn(4, 32)
    out = fake_quantize(w, get_format("ternary", group_size=16), scale_dtype=torch.float16)
    out.backward(g)
    assert torch.equal(w.grad, g)  # BitNet's STE: every latent weight gets the gradient
    with torch.no_grad():
        assert torch.equal(out, fake_quantize(w, get_format("ternary", group_size=16),
                                              scale_dtype=torch.float16))


def _ternary_model(model, q):
    return replace_linears(model, decoder_linear_names(model),
                           lambda _n, lin: QuantLinear.from_linear(lin, q))


@pytest.mark.parametrize("scaling", SCALINGS)
def test_packed_logits_equal_training_logits(tiny_copy, scaling):
    model, _ = tiny_copy
    _ternary_model(model, QuantFormat(fmt="ternary", group_size=32, scaling=scaling))
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        train_logits = model(ids).logits
        for _, m in quantized_modules(model):
            m.pack()
        packed_logits = model(ids).logits
    assert torch.equal(train_logits, packed_logits)
    assert all(isinstance(m, PackedLinear) and not hasattr(m, "weight")
               for _, m in quantized_modules(model))


def test_packed_state_dict_round_trip_and_bits_per_weight(tiny_copy):
    from harness.eval.memory import model_memory

    model, _ = tiny_copy
    first = decoder_linear_names(model)[0]
    _ternary_model(model, QuantFormat(fmt="ternary", group_size=64))
    trained = dict(quantized_modules(model))[first]
    packed = trained.to_packed()  # a new module; the training form is left as it was
    assert isinstance(trained, QuantLinear) and isinstance(packed, PackedLinear)
    spec = packed.packed_spec()
    assert spec["type"] == "QuantLinear" and spec["qformat"]["scaling"] == "absmean"
    fresh = QuantLinear.from_packed_spec(spec)
    fresh.load_state_dict(packed.state_dict())
    x = torch.randn(3, packed.in_features)
    assert torch.equal(fresh(x), packed(x))
    with torch.no_grad():
        assert torch.equal(trained(x), packed(x))
    for _, m in quantized_modules(model):
        m.pack()
    mem = model_memory(model)
    n = sum(m.num_weights for _, m in quantized_modules(model))
    stored = sum(m.q_codes.numel() + m.q_scales.numel() * 2 for _, m in quantized_modules(model))
    assert mem["quantized_bytes"] == stored  # no zeros, no bias in tiny-llama's linears
    assert mem["bits_per_weight"] == pytest.approx(stored * 8 / n, rel=1e-3)
    assert mem["bits_per_weight"] == pytest.approx(1.6 + 16 / 64, rel=1e-3)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(fmt="ternary", bits=3), "fixed at 1.58 bits"),
    (dict(fmt="ternary", symmetric=True), "symmetric"),
    (dict(fmt="int", bits=3, scaling="absmax"), "does not apply to fmt=int"),
    (dict(fmt="ternary", scaling="l2"), "scaling"),
])
def test_bad_specs(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuantFormat(**kwargs)


def test_bad_loose_arguments():
    with pytest.raises(HarnessError, match="fixed at 1.58 bits"):
        fake_quantize(torch.randn(4, 64), "ternary", 3)
    with pytest.raises(HarnessError, match="unknown format 'tenary'; did you mean 'ternary'"):
        fake_quantize(torch.randn(4, 64), "tenary")


def test_int_and_nf3_specs_serialise_as_before():
    assert QuantFormat(fmt="int", bits=2, group_size=64).model_dump() == \
        {"fmt": "int", "bits": 2, "group_size": 64, "symmetric": False}
    q = QuantFormat(fmt="nf3", bits=3)
    assert q.model_dump_json() == '{"fmt":"nf3","bits":3,"group_size":128,"symmetric":false}'


def test_config_fills_width_and_scaling():
    from harness.registry import get_method

    cfg = get_method("rtn").Config(fmt="ternary", scaling="absmax")
    assert (cfg.bits, cfg.scaling) == (2, "absmax")
    assert cfg.qformat().format() == get_format("ternary", group_size=-1, scaling="absmax")
    assert "scaling" not in get_method("rtn").Config(bits=2).model_dump()  # run keys as before
    with pytest.raises(HarnessError, match="drop --bits"):
        get_method("rtn").Config(fmt="ternary", bits=3)
    again = get_method("rtn").Config(**cfg.model_dump())  # stored specs validate again
    assert again == cfg and copy.deepcopy(again) == cfg
