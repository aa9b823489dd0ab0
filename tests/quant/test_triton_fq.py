"""The fused Triton kernel (CUDA) equals the op-by-op reference graph, forward and backward.
(Packed logits == training logits on CUDA: tests/quant/test_linear.py, device "cuda".)"""

import itertools

import pytest
import torch

from harness.quant.formats import fake_quantize
from tests.quant.triton_interpret_cases import FORMATS, case_weight

pytestmark = pytest.mark.gpu

# The interpreter tests' cases (tests/quant/triton_interpret_cases.py), compiled for CUDA here.
# (detach_scales, scale_dtype): every kernel variant compiles once, so keep the product small.
SCALES = [(False, torch.float16), (True, torch.float16), (False, None)]


@pytest.mark.parametrize("case,scales,dtype", list(itertools.product(
    FORMATS, SCALES, [torch.float32, torch.bfloat16])))
def test_triton_matches_reference(case, scales, dtype):
    fmt, bits, group, sym = case
    detach, scale_dtype = scales
    w = case_weight(dtype, group).cuda()
    g = torch.randn(w.shape, device="cuda").to(dtype)
    outs, grads = [], []
    for fused in (True, False):
        x = w.clone().requires_grad_()
        y = fake_quantize(x, fmt, bits, group, sym, detach_scales=detach,
                          scale_dtype=scale_dtype, fused=fused)
        y.backward(g)
        outs.append(y.detach().float())
        grads.append(x.grad.float())
    assert torch.equal(outs[0], outs[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grads[0], grads[1], atol=tol, rtol=tol)


def test_triton_is_used_on_cuda():
    from harness.quant import primitives

    assert primitives.triton_ok()
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    y = fake_quantize(x, "int", 2, 16)
    assert type(y.grad_fn).__name__.startswith("TritonFakeQuant")


def test_large_matrix_matches_reference():
    torch.manual_seed(0)
    w = (torch.randn(1024, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    g = torch.randn_like(w)
    for fmt, bits in (("int", 2), ("nf3", 3)):
        res = []
        for fused in (True, False):
            x = w.clone().requires_grad_()
            y = fake_quantize(x, fmt, bits, 128, scale_dtype=torch.float16, fused=fused)
            y.backward(g)
            res.append((y.detach(), x.grad))
        assert torch.equal(res[0][0], res[1][0])
        assert torch.allclose(res[0][1].float(), res[1][1].float(), atol=2e-2, rtol=2e-2)


def test_many_weights_in_one_launch_equal_one_launch_each_on_cuda():
    from harness.quant.triton_fq import fake_quantize_many, fake_quantize_triton

    shapes = [(64, 576), (192, 576), (576, 1536), (5, 96)]
    for fmt, bits, sym in (("int", 2, False), ("int", 3, True), ("nf3", 3, False)):
        torch.manual_seed(bits)
        ws = [(torch.randn(s) * 0.02).cuda() for s in shapes]
        gs = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
        xs = [w.clone().requires_grad_() for w in ws]
        outs = fake_quantize_many(xs, fmt, bits, 32, sym, False, torch.float16,
                                  out_dtype=torch.bfloat16)
        torch.autograd.backward(outs, gs)
        for w, g, x, o in zip(ws, gs, xs, outs, strict=True):
            y = w.clone().requires_grad_()
            ref = fake_quantize_triton(y, fmt, bits, 32, sym, False, torch.float16,
                                       out_dtype=torch.bfloat16)
            ref.backward(g)
            assert torch.equal(o.detach(), ref.detach())
            assert torch.equal(x.grad, y.grad)


def test_batched_training_step_equals_per_layer_on_cuda(tiny):
    import copy

    from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears
    from harness.quant.batched import BatchedFakeQuant

    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device="cuda")
    q = QuantFormat(fmt="int", bits=2, group_size=32)
    found = []
    for batched in (False, True):
        m = copy.deepcopy(model).cuda().train()
        replace_linears(m, decoder_linear_names(m), lambda _n, lin: QuantLinear.from_linear(lin, q))
        if batched:
            BatchedFakeQuant(m)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        found.append((loss.detach(), [p.grad for p in m.parameters() if p.grad is not None]))
    assert torch.equal(found[0][0], found[1][0])
    assert len(found[0][1]) == len(found[1][1])
    for a, b in zip(found[0][1], found[1][1], strict=True):
        assert torch.equal(a, b)
