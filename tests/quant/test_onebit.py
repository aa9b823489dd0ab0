"""OneBit: sign STE, SVID, the layer's two forms (exactly equal), storage size."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.quant.onebit import OneBitLinear, rank1_svd_error, sign_ste, svid, svid_error


def test_sign_ste_values_and_gradient():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    y = sign_ste(w)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]  # sign(0) = +1
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y.backward(upstream)
    expected = [g * (1.001 - math.tanh(v) ** 2)
                for g, v in zip(upstream.tolist(), [-2.0, -0.5, 0.0, 0.3, 1.5], strict=True)]
    assert w.grad.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["nmf", "svd"])
def test_svid_beats_rank1_svd_on_gaussian(method):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    a, b = svid(w, method=method)
    assert a.shape == (64,) and b.shape == (96,)
    assert (a >= 0).all() and (b >= 0).all()
    e_svid, e_svd = float(svid_error(w, a, b)), float(rank1_svd_error(w))
    # |w| ~ E|w| (1 1^T): error^2 ~ (1 - 2/pi) ||W||^2 vs ~ ||W||^2 for rank-1 SVD of W.
    assert e_svid < 0.8 * e_svd
    assert e_svid == pytest.approx(math.sqrt(1 - 2 / math.pi) * float(w.norm()), rel=0.1)


def test_nmf_reaches_the_svd_optimum_and_recovers_exact_rank1():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    e_nmf = float(svid_error(w, *svid(w, "nmf")))
    e_svd = float(svid_error(w, *svid(w, "svd")))
    assert e_nmf <= e_svd * (1 + 1e-4)
    gen = torch.Generator().manual_seed(2)
    a0, b0 = torch.rand(20, generator=gen) + 0.1, torch.rand(30, generator=gen) + 0.1
    signs = torch.where(torch.rand(20, 30, generator=gen) < 0.5, -1.0, 1.0)
    exact = signs * torch.outer(a0, b0)
    assert float(svid_error(exact, *svid(exact))) < 1e-4 * float(exact.norm())
    a, b = svid(exact)
    assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-5)  # balanced scale
    with pytest.raises(HarnessError):
        svid(w, method="pca")


def test_from_linear_init_and_forward_formula():
    lin = nn.Linear(48, 32, bias=True)
    m = OneBitLinear.from_linear(lin)
    a, b = svid(lin.weight)
    assert torch.allclose(m.h, a) and torch.allclose(m.g, b)
    assert torch.equal(m.weight, torch.where(lin.weight >= 0, 0.01, -0.01))
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"weight", "g", "h", "bias"}
    x = torch.randn(3, 5, 48)
    g, h, bias = (t.detach().half().float() for t in (m.g, m.h, m.bias))
    y = ((x * g) @ torch.where(lin.weight >= 0, 1.0, -1.0).T) * h
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(m(x), y + bias, atol=1e-5)
    m(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def _tiny_llama():
    from transformers import LlamaForCausalLM

    from harness.models import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(61)).eval()


def _swap(model, make):
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}":
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(mod))
    return model


@torch.no_grad()
def test_packed_logits_equal_training_logits_and_state_round_trips():
    base = _tiny_llama()
    trained = _swap(copy.deepcopy(base), OneBitLinear.from_linear)
    for mod in trained.modules():  # move latent weights/vectors off their init, like training
        if isinstance(mod, OneBitLinear):
            mod.weight.add_(torch.randn_like(mod.weight) * 0.02)
            mod.g.mul_(1 + 0.1 * torch.rand_like(mod.g))
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    train_logits = trained(ids).logits
    packed = copy.deepcopy(trained)
    for mod in packed.modules():
        if isinstance(mod, OneBitLinear):
            mod.pack()
    assert torch.equal(packed(ids).logits, train_logits)  # stored == evaluated, bit for bit
    state = packed.state_dict()
    assert any(k.endswith("sign_bits") for k in state)
    fresh = _swap(copy.deepcopy(base), lambda lin: OneBitLinear.from_packed_spec(
        {"type": "OneBitLinear", "in_features": lin.in_features,
         "out_features": lin.out_features, "bias": lin.bias is not None}))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(ids).logits, train_logits)


def test_packed_vectors_stay_fp16_under_dtype_casts():
    m = OneBitLinear.from_linear(nn.Linear(16, 8)).pack()
    m.to(torch.float64)
    assert m.g.dtype == m.h.dtype == m.bias.dtype == torch.float16
    assert m.sign_bits.dtype == torch.uint8
    assert m(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


def test_bits_per_weight_measured_from_packed_tensors():
    lin = nn.Linear(160, 96, bias=False)
    m = OneBitLinear.from_linear(lin)
    before = m.packed_nbytes()  # training form: what the packed form would take
    m.pack()
    assert m.packed_nbytes() == before
    assert m.packed_nbytes() * 8 / m.num_weights == pytest.approx(1 + 16 * (160 + 96) / (160 * 96))
    big = OneBitLinear.empty_packed(4096, 4096)
    assert big.packed_nbytes() * 8 / big.num_weights == pytest.approx(1.0078125)


def _trained_layer(dtype, bias=True, seed=0):
    """A training-form layer moved off its init, with some g/h entries negative."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(40, 24, bias=bias).to(dtype)
    m = OneBitLinear.from_linear(lin)
    with torch.no_grad():
        m.weight.add_(torch.randn(m.weight.shape, generator=gen, dtype=dtype) * 0.02)
        m.g.mul_(torch.randn(m.g.shape, generator=gen, dtype=dtype))
        m.h.mul_(torch.randn(m.h.shape, generator=gen, dtype=dtype))
    return m


@pytest.mark.parametrize("bias", [True, False])
def test_folded_forward_and_gradients_equal_the_paper_formula(bias):
    # fp64: the two orders of the same products agree to ~1e-15, so a wrong gradient term
    # (a missing tanh factor, g and h swapped, a dropped sign) cannot hide in the tolerance.
    m = _trained_layer(torch.float64, bias=bias)
    x = torch.randn(3, 7, 40, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, 24, dtype=torch.float64)
    grads = []
    for fwd in (m.forward, m.reference_forward):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y = fwd(x)
        (y * up).sum().backward()
        grads.append((y.detach(), x.grad.clone(),
                      {n: p.grad.clone() for n, p in m.named_parameters()}))
    (y1, gx1, gp1), (y2, gx2, gp2) = grads
    assert torch.allclose(y1, y2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gx1, gx2, rtol=1e-10, atol=1e-12)
    assert set(gp1) == set(gp2) == ({"weight", "g", "h"} | ({"bias"} if bias else set()))
    for name in gp1:
        assert torch.allclose(gp1[name], gp2[name], rtol=1e-10, atol=1e-12), name


def test_folded_forward_fp32_close_to_paper_formula_and_packed_equal():
    m = _trained_layer(torch.float32)
    x = torch.randn(5, 40)
    assert torch.allclose(m(x), m.reference_forward(x), atol=2e-5)
    packed = copy.deepcopy(m).pack()
    assert torch.equal(packed(x), m(x))
    assert torch.allclose(packed.reference_forward(x), m.reference_forward(x), atol=1e-6)


def test_negative_zero_latent_weight_is_plus_one_in_both_forms():
    m = OneBitLinear.from_linear(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        m.weight[0, :4] = -0.0
        m.weight[1, :4] = 0.0
    signs = sign_ste(m.weight.detach())
    assert (signs[:2, :4] == 1).all()
    x = torch.randn(2, 8)
    assert torch.equal(copy.deepcopy(m).pack()(x), m(x))


@pytest.mark.gpu
def test_folded_layer_on_cuda_under_bf16_autocast():
    # The trainer's setting: fp32 parameters, bf16 autocast. Folding moves the bf16 rounding
    # from x * g to h g^T * sign: the outputs agree to bf16 precision, the packed form exactly.
    m = _trained_layer(torch.float32).cuda()
    x = torch.randn(4, 64, 40, device="cuda", requires_grad=True)
    up = torch.randn(4, 64, 24, device="cuda")  # LayerNorm makes a loss like sum(y^2) constant
    outs = []
    for fwd in (m.forward, m.reference_forward):
        m.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fwd(x)
        (y.float() * up).sum().backward()
        outs.append([y.float().detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*outs, strict=True):  # bf16 keeps 8 bits: ~0.4% per rounding
        assert float((a - b).norm() / b.norm()) < 0.02
    packed = copy.deepcopy(m).pack()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(packed(x), m(x))


# --------------------------------------------------------------------------- batched weights


def _random_layers(dtype=torch.float32, shapes=((24, 40), (8, 40), (40, 16))):
    torch.manual_seed(3)
    ws = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    ws[0][0, :3] = torch.tensor([0.0, -0.0, 0.0])  # sign(+-0) = +1
    gs = [torch.rand(i, dtype=dtype) + 0.5 for _, i in shapes]
    hs = [torch.rand(o, dtype=dtype) + 0.5 for o, _ in shapes]
    return [t.requires_grad_() for t in ws + gs + hs]


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_effective_weights_of_many_layers_equal_one_by_one(out_dtype):
    from harness.quant.onebit import effective_weight, effective_weights

    n = 3
    torch.manual_seed(4)
    ups = [torch.randn(o, i) for o, i in ((24, 40), (8, 40), (40, 16))]
    found = []
    for many in (True, False):
        ts = _random_layers()
        ws, gs, hs = ts[:n], ts[n : 2 * n], ts[2 * n :]
        if many:
            outs = effective_weights(ws, gs, hs, torch.float32, out_dtype)
        else:
            outs = [effective_weight(w, g, h).to(out_dtype or torch.float32)
                    for w, g, h in zip(ws, gs, hs, strict=True)]
        sum((o * u.to(o.dtype)).float().sum() for o, u in zip(outs, ups, strict=True)).backward()
        found.append(([o.detach() for o in outs], [t.grad for t in ts]))
    (outs_many, grads_many), (outs_one, grads_one) = found
    for a, b in zip(outs_many, outs_one, strict=True):
        assert a.dtype == (out_dtype or torch.float32) and torch.equal(a, b)
    for a, b in zip(grads_many, grads_one, strict=True):
        assert a is not None and a.dtype == torch.float32 and torch.equal(a, b)
    # and the value is the layer's formula: h16 g16^T * (+1 where w >= 0 else -1)
    ws, gs, hs = _random_layers()[:n], _random_layers()[n : 2 * n], _random_layers()[2 * n :]
    for o, w, g, h in zip(outs_many, ws, gs, hs, strict=True):
        signs = torch.where(w.detach() >= 0, 1.0, -1.0)
        ref = torch.outer(h.detach().half().float(), g.detach().half().float()) * signs
        assert torch.equal(o, ref.to(o.dtype))


def _tiny_onebit():
    from harness.models import load_model
    from harness.quant.modules import decoder_linear_names, replace_linears

    model, _ = load_model("tiny-llama")
    model = copy.deepcopy(model)
    replace_linears(model, decoder_linear_names(model),
                    lambda _n, lin: OneBitLinear.from_linear(lin, iters=3))
    return model


def _step(model, ids, device_type, amp, batched, chunk=None):
    from harness.quant.batched import BatchedOneBit, _chunks

    m = copy.deepcopy(model).train()
    hooks = BatchedOneBit(m) if batched else None
    if hooks is not None and chunk is not None:
        hooks.chunk_weights = chunk
        assert len(_chunks(hooks.layers, chunk)) > 3
    own = []
    for layer in m.modules():
        if isinstance(layer, OneBitLinear):
            real = layer._weight
            layer._weight = lambda dtype, real=real: own.append(1) or real(dtype)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    if hooks is not None:
        assert len(hooks.layers) == 14
        assert all(layer.batched_weight is None for layer in hooks.layers)  # cleared after
        assert not own  # every layer took the batched weight
    else:
        assert len(own) == 14
    return loss.detach(), [(n, p.grad) for n, p in m.named_parameters() if p.grad is not None]


@pytest.mark.parametrize(("amp", "chunk"), [(False, None), (True, None), (False, 20_000)])
def test_batched_onebit_training_step_equals_per_layer(amp, chunk):
    model = _tiny_onebit()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    (l1, g1), (l2, g2) = (_step(model, ids, "cpu", amp, b, chunk) for b in (False, True))
    assert torch.equal(l1, l2)
    assert [n for n, _ in g1] == [n for n, _ in g2] and len(g1) > 40
    for (name, a), (_, b) in zip(g1, g2, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_batched_onebit_training_step_equals_per_layer_on_cuda():
    model = _tiny_onebit().cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device="cuda")
    (l1, g1), (l2, g2) = (_step(model, ids, "cuda", True, b) for b in (False, True))
    assert torch.equal(l1, l2)
    for (name, a), (_, b) in zip(g1, g2, strict=True):
        assert torch.equal(a, b), name
