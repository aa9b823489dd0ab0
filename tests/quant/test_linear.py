import copy

import pytest
import torch
from torch import nn

from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears
from harness.quant.modules import quantized_modules


def _quantize_model(model, q):
    return replace_linears(model, decoder_linear_names(model),
                           lambda _n, lin: QuantLinear.from_linear(lin, q))


def test_decoder_linears_exclude_lm_head(tiny):
    model, _ = tiny
    names = decoder_linear_names(model)
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)


# Every format: integer 1-8 bits asymmetric, 2-8 symmetric, NF3, at a group size and per row.
ALL_FORMATS = [QuantFormat(fmt="int", bits=b, group_size=g, symmetric=s)
               for b in range(1, 9) for s in (False, True) for g in (32, -1) if (b, s) != (1, True)]
ALL_FORMATS += [QuantFormat(fmt="nf3", bits=3, group_size=g) for g in (64, -1)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("q", ALL_FORMATS, ids=lambda q: f"{q.fmt}{q.bits}-g{q.group_size}"
                         f"{'-sym' if q.symmetric else ''}")
def test_packed_logits_equal_training_logits(tiny_copy, q, device):
    """On CUDA the training form runs the Triton kernel, the packed form torch's dequantize."""
    model, _ = tiny_copy
    model.to(device)
    _quantize_model(model, q)
    ids = torch.randint(0, 1000, (2, 16), device=device)
    with torch.no_grad():
        train_logits = model(ids).logits
        for _, m in quantized_modules(model):
            m.pack()
        packed_logits = model(ids).logits
    assert torch.equal(train_logits, packed_logits)
    assert all(m.packed and not hasattr(m, "weight") for _, m in quantized_modules(model))


def test_packed_state_dict_round_trip(tiny_copy):
    model, _ = tiny_copy
    q = QuantFormat(fmt="int", bits=3, group_size=64)
    first = decoder_linear_names(model)[0]
    _quantize_model(model, q)
    lin = dict(quantized_modules(model))[first].pack()
    fresh = QuantLinear.from_packed_spec(lin.packed_spec())
    fresh.load_state_dict(lin.state_dict())
    x = torch.randn(3, lin.in_features)
    assert torch.equal(fresh(x), lin(x))


def test_training_state_has_ste_gradients():
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, QuantFormat(fmt="int", bits=2, group_size=32))
    q(torch.randn(4, 64)).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_to_linear_matches(tiny_copy):
    lin = nn.Linear(64, 16)
    q = QuantLinear.from_linear(copy.deepcopy(lin), QuantFormat(fmt="nf3", bits=3, group_size=64))
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(q.to_linear()(x), q(x), atol=1e-6)


def test_memory_accounting(tiny_copy):
    from harness.eval.memory import model_memory

    model, _ = tiny_copy
    fp = model_memory(model)
    assert fp["bits_per_weight"] == 16.0 and fp["quantized_bytes"] == 0
    _quantize_model(model, QuantFormat(fmt="int", bits=2, group_size=64))
    for _, m in quantized_modules(model):
        m.pack()
    mem = model_memory(model)
    # 2-bit codes + fp16 scale and 2-bit zero per 64 weights = 2 + (16 + 2) / 64 bits.
    assert mem["bits_per_weight"] == pytest.approx(2 + 18 / 64, rel=1e-3)
    assert mem["total_bytes"] < fp["total_bytes"]
    assert mem["total_bytes"] == mem["quantized_bytes"] + mem["fp_bytes"]
