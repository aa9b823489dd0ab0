"""GPTQ (harness.quant.gptq) against RTN, a direct column-by-column loop and the storage."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.quant.formats import get_format
from harness.quant.gptq import (
    accumulate_hessian,
    gptq_quantize,
    group_params,
    latent_for_storage,
    output_error,
    quantize_with,
)

FORMATS = [("int", 3, 32, False), ("int", 4, 64, True), ("nf3", 3, 32, False),
           ("ternary", 2, 32, False), ("int", 2, -1, False)]


def _weight_and_hessian(out_f=48, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) * 0.15 + torch.eye(in_f)
    x = torch.randn(1024, in_f, generator=g) @ mix  # correlated inputs: where GPTQ pays
    x[:, 5] = 0  # a dead input
    h, _ = accumulate_hessian(None, 0, x)
    return w, h, x


def _slow_reference(w, h, fmt, damp=0.01, act_order=False):
    """The reference's fasterquant loop one column at a time, no lazy blocks."""
    w, h = w.clone().float(), h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    n = w.shape[1]
    gs = n if fmt.group_size == -1 else fmt.group_size
    static = act_order or gs == n
    groups = [group_params(fmt, w[:, i:i + gs]) for i in range(0, n, gs)]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    p = None
    for j in range(n):
        if static:
            p = groups[int(perm[j]) // gs]
        elif j % gs == 0:
            p = group_params(fmt, w[:, j:j + gs])
        q[:, j] = quantize_with(fmt, w[:, j:j + 1], p)[:, 0]
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
    return q[:, torch.argsort(perm)]


@pytest.mark.parametrize("spec", FORMATS)
def test_beats_rtn_on_correlated_inputs(spec):
    fmt = get_format(*spec)
    w, h, x = _weight_and_hessian()
    q = gptq_quantize(w, h, fmt).weight
    rtn = fmt.fake_quantize(w, scale_dtype=torch.float16)
    assert output_error(w, q, h) < 0.8 * output_error(w, rtn, h)
    # the same thing measured directly on the inputs
    assert (x @ (w - q).T).norm() < (x @ (w - rtn).T).norm()


@pytest.mark.parametrize("spec", FORMATS)
def test_identity_hessian_is_rtn(spec):
    """With H = I the error feedback is zero: GPTQ is round-to-nearest."""
    fmt = get_format(*spec)
    w, _, _ = _weight_and_hessian()
    rtn = fmt.fake_quantize(w, scale_dtype=torch.float16)
    eye = torch.eye(w.shape[1])
    assert torch.equal(gptq_quantize(w, eye, fmt, pin_extremes=False).weight, rtn)
    assert torch.equal(gptq_quantize(w, eye, fmt, act_order=True, pin_extremes=False).weight, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", FORMATS)
def test_lazy_blocks_match_the_column_loop(spec, act_order):
    fmt = get_format(*spec)
    w, h, _ = _weight_and_hessian()
    fast = gptq_quantize(w, h, fmt, block_size=48, act_order=act_order, pin_extremes=False)
    slow = _slow_reference(w, h, fmt, act_order=act_order)
    # float reassociation can flip a rounding at a grid midpoint: all but a handful equal
    close = torch.isclose(fast.weight, slow, atol=1e-5)
    assert close.float().mean() > 0.995


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", FORMATS)
def test_stored_form_gives_wq_back(spec, act_order):
    fmt = get_format(*spec)
    w, h, _ = _weight_and_hessian()
    q = gptq_quantize(w, h, fmt, act_order=act_order).weight
    latent = latent_for_storage(q, fmt)
    assert torch.equal(fmt.fake_quantize(latent, scale_dtype=torch.float16), q)
    assert torch.equal(fmt.pack(latent).dequantize(), q)


@pytest.mark.parametrize("spec", [("int", 3, 32, False), ("nf3", 3, 32, False)])
def test_act_order_keeps_groups_contiguous(spec):
    """The parameters GPTQ used are those of the original contiguous groups, and exactly the
    ones storage derives from W_q's groups."""
    fmt = get_format(*spec)
    w, h, _ = _weight_and_hessian()
    res = gptq_quantize(w, h, fmt, act_order=True)
    assert not torch.equal(res.perm, torch.arange(w.shape[1]))
    stored = fmt.quantize(res.weight)
    w0 = w.clone()
    w0[:, 5] = 0  # the dead input, zeroed before the groups' parameters are taken
    for gi, g0 in enumerate(range(0, w.shape[1], 32)):
        p = group_params(fmt, w0[:, g0:g0 + 32])
        assert torch.equal(stored.scales[:, gi].float(), p.a[:, 0])
        assert torch.equal(stored.zeros[:, gi].float(), p.b[:, 0])


def test_dead_inputs_are_zero():
    fmt = get_format("int", 3, 32)
    w, h, _ = _weight_and_hessian()
    assert torch.all(gptq_quantize(w, h, fmt).weight[:, 5] == 0)


@pytest.mark.parametrize("bad", ["shape", "group", "format"])
def test_bad_input_is_one_line(bad):
    w, h, _ = _weight_and_hessian()
    fmt = get_format("int", 3, 32)
    if bad == "shape":
        h = h[:-1, :-1]
    elif bad == "group":
        fmt = get_format("int", 3, 48)
    else:
        fmt = get_format("binary", 1, -1)
    with pytest.raises(HarnessError) as exc:
        gptq_quantize(w, h, fmt)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("spec", FORMATS[:4])
def test_identity_hessian_with_pinning_is_rtn_but_at_the_pinned_extremes(spec):
    """With H = I nothing is fed forward, so pinning changes only the elements it pins: each
    group's max and min (absmax for symmetric grids); ternary absmean pins nothing."""
    fmt = get_format(*spec)
    w, _, _ = _weight_and_hessian()
    rtn = fmt.fake_quantize(w, scale_dtype=torch.float16)
    q = gptq_quantize(w, torch.eye(w.shape[1]), fmt).weight
    gs = fmt.group_size
    g = w.reshape(w.shape[0], -1, gs)
    pinned = torch.zeros_like(g, dtype=torch.bool)
    symmetric = (fmt.name == "int" and fmt.symmetric) or fmt.name == "ternary"
    for idx in ([g.abs().argmax(-1)] if symmetric else [g.argmax(-1), g.argmin(-1)]):
        pinned.scatter_(-1, idx.unsqueeze(-1), True)
    pinned = pinned.reshape(w.shape)
    if fmt.name == "ternary" and fmt.scaling == "absmean":
        pinned[:] = False
    assert torch.equal(q[~pinned], rtn[~pinned])
