"""The fused INT Function equals the op-by-op reference graph, forward and backward."""

import pytest
import torch

from harness.quant.formats import fake_quantize


@pytest.mark.parametrize("bits,group,sym", [(2, 16, False), (3, 32, False), (4, -1, False),
                                            (1, 16, False), (8, 16, False), (3, 16, True),
                                            (2, 32, True), (4, -1, True)])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
def test_fused_matches_reference(bits, group, sym, detach, scale_dtype):
    torch.manual_seed(bits * 31 + group)
    w = torch.randn(8, 64) * 0.05
    w[0, 3] = w[0, 5] = w[0].max() + 0.01  # a tied maximum
    g = torch.randn(8, 64)
    outs, grads = [], []
    for fused in (True, False):
        x = w.clone().requires_grad_()
        y = fake_quantize(x, "int", bits, group, sym, detach_scales=detach,
                          scale_dtype=scale_dtype, fused=fused)
        y.backward(g)
        outs.append(y.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("group", [16, 32, -1])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
def test_fused_nf3_matches_reference(group, detach, scale_dtype):
    torch.manual_seed(abs(group))
    w = torch.randn(8, 64) * 0.05
    w[0, 3] = w[0, 5] = w[0].max() + 0.01   # tied maximum
    w[0, 7] = w[0, 9] = w[0].min() - 0.01   # tied minimum
    w[1, :16] = w[1, :16].abs()             # a group with no negative value
    w[2, :16] = 0.0                         # a constant group (scales clamped)
    g = torch.randn(8, 64)
    outs, grads = [], []
    for fused in (True, False):
        x = w.clone().requires_grad_()
        y = fake_quantize(x, "nf3", 3, group, detach_scales=detach, scale_dtype=scale_dtype,
                          fused=fused)
        y.backward(g)
        outs.append(y.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_fused_nf3_is_used_and_matches_packing():
    from harness.quant.formats import dequantize, quantize

    w = (torch.randn(16, 128) * 0.02).requires_grad_()
    y = fake_quantize(w, "nf3", 3, 64, scale_dtype=torch.float16)
    fn, names = y.grad_fn, []
    while fn is not None:  # the Function sits under the reshape/cast nodes
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert any(n.startswith("NF3FakeQuant") for n in names), names
    packed = dequantize(quantize(w.detach(), "nf3", 3, 64))
    assert torch.equal(y.detach(), packed)
