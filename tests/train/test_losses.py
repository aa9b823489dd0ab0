"""Losses against values computed here with plain ``math`` on tiny explicit logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.api import ObjectiveInputs
from harness.errors import HarnessError
from harness.train import losses as L

# B=2 sequences, T=2 positions, V=3 classes.
S = [[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[0.5, -1.0, 2.0], [3.0, 1.0, 0.0]]]
T = [[[2.0, 0.0, 1.0], [1.0, 1.0, 3.0]], [[0.0, 0.0, 0.0], [-1.0, 2.0, 0.5]]]
Y = [[2, 0], [1, -100]]


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def valid(b, t):
    return Y[b][t] != -100


def batchmean(per_pos):
    """Sum over the valid positions of each sequence, mean over the 2 sequences."""
    return sum(per_pos(b, t) for b in range(2) for t in range(2) if valid(b, t)) / 2


def tensors():
    return torch.tensor(S), torch.tensor(T), torch.tensor(Y)


def P(x, b, t):
    return softmax(x[b][t])


def test_ce_is_token_mean_nll():
    s, _, y = tensors()
    expected = -sum(math.log(P(S, b, t)[Y[b][t]]) for b in range(2) for t in range(2)
                    if valid(b, t)) / 3
    assert L.ce(s, y).item() == pytest.approx(expected, rel=1e-6)


def test_forward_and_reverse_kl_values():
    s, t, y = tensors()
    fkl = batchmean(lambda b, i: kl(P(T, b, i), P(S, b, i)))
    rkl = batchmean(lambda b, i: kl(P(S, b, i), P(T, b, i)))
    assert L.forward_kl(s, t, y).item() == pytest.approx(fkl, rel=1e-6)
    assert L.reverse_kl(s, t, y).item() == pytest.approx(rkl, rel=1e-6)
    assert fkl != pytest.approx(rkl, rel=1e-3)  # the test distinguishes the two directions
    mean = L.forward_kl(s, t, y, reduction="mean").item()
    assert mean == pytest.approx(fkl * 2 / 3, rel=1e-6)


def test_masking_ignores_positions():
    s, t, y = tensors()
    s2 = s.clone()
    s2[1, 1] = torch.tensor([50.0, -50.0, 7.0])  # position (1, 1) is -100: must not matter
    for fn in (L.forward_kl, L.reverse_kl, L.jsd):
        assert fn(s2, t, y).item() == pytest.approx(fn(s, t, y).item(), rel=1e-6)
    assert L.ce(s2, y).item() == pytest.approx(L.ce(s, y).item(), rel=1e-6)
    all_masked = torch.full_like(y, -100)
    assert L.forward_kl(s, t, all_masked).item() == 0.0
    assert L.ce(s, all_masked).item() == 0.0


def test_kl_of_identical_distributions_is_zero():
    s, _, y = tensors()
    for fn in (L.forward_kl, L.reverse_kl, L.jsd):
        assert fn(s, s, y).item() == pytest.approx(0.0, abs=1e-6)
    assert L.cakld(s, s, y, gamma=0.3).item() == pytest.approx(0.0, abs=1e-6)


def test_cakld_endpoints_and_mixture():
    s, t, y = tensors()
    assert L.cakld(s, t, y, gamma=1.0).item() == pytest.approx(L.reverse_kl(s, t, y).item())
    assert L.cakld(s, t, y, gamma=0.0).item() == pytest.approx(L.forward_kl(s, t, y).item())
    expected = batchmean(lambda b, i: 0.3 * kl(P(S, b, i), P(T, b, i))
                         + 0.7 * kl(P(T, b, i), P(S, b, i)))
    assert L.cakld(s, t, y, gamma=0.3).item() == pytest.approx(expected, rel=1e-6)


def test_jsd_value_and_symmetry():
    s, t, y = tensors()

    def js(b, i, beta=0.5):
        p, q = P(T, b, i), P(S, b, i)
        m = [beta * a + (1 - beta) * c for a, c in zip(p, q, strict=True)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)

    assert L.jsd(s, t, y).item() == pytest.approx(batchmean(js), rel=1e-6)
    assert L.jsd(s, t, y).item() == pytest.approx(L.jsd(t, s, y).item(), rel=1e-6)
    assert L.jsd(s, t, y, beta=0.2).item() == pytest.approx(
        batchmean(lambda b, i: js(b, i, 0.2)), rel=1e-6)
    with pytest.raises(HarnessError):
        L.jsd(s, t, y, beta=1.5)


def test_tlsd_value():
    s, t, y = tensors()
    expected = 0.0
    for b in range(2):
        pos = [i for i in range(2) if valid(b, i)]
        scores = [-math.log(P(T, b, i)[Y[b][i]]) / 10 for i in pos]
        w = softmax(scores)
        for wi, i in zip(w, pos, strict=True):
            soft_ce = -sum(pt * math.log(ps) for pt, ps in zip(P(T, b, i), P(S, b, i),
                                                               strict=True))
            expected += wi * soft_ce
    assert L.tlsd(s, t, y).item() == pytest.approx(expected, rel=1e-6)


def test_gamma_paper_by_hand():
    _, t, y = tensors()
    expected = (P(T, 0, 0)[2] + P(T, 0, 1)[0] + P(T, 1, 0)[1]) / 3
    assert L.gamma_paper(t, y) == pytest.approx(expected, rel=1e-6)


def test_gamma_code_divides_the_sum_by_cakld_steps():
    _, t, _ = tensors()
    batch_mean = sum(max(P(T, b, i)) for b in range(2) for i in range(2)) / 4
    assert L.gamma_code([t] * 11) == pytest.approx(11 * batch_mean / 10, rel=1e-6)
    assert L.gamma_code([t, t], cakld_steps=2) == pytest.approx(batch_mean, rel=1e-6)


def test_bf16_logits_accumulate_in_fp32():
    s, t, y = tensors()
    out = L.forward_kl(s.bfloat16(), t.bfloat16(), y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(L.forward_kl(s, t, y).item(), rel=1e-2)


def test_extreme_logits_stay_finite():
    s = torch.tensor([[[1000.0, -1000.0, 0.0]]])
    t = torch.tensor([[[-1000.0, 1000.0, float("-inf")]]])
    y = torch.tensor([[1]])
    for fn in (L.forward_kl, L.reverse_kl, L.jsd):
        assert torch.isfinite(fn(s, t, y))


def test_onebit_loss_kd_and_hidden_terms():
    s, t, y = tensors()
    h_t = (torch.ones(2, 2, 2), torch.tensor([[[3.0, 4.0]] * 2] * 2), torch.randn(2, 2, 2))
    h_s = (torch.ones(2, 2, 2), torch.tensor([[[4.0, 3.0]] * 2] * 2), torch.randn(2, 2, 2))
    # layer 1: unit vectors (.6,.8) vs (.8,.6): squared distance .08 at every token
    fkl = L.forward_kl(s, t, y).item()
    out = L.onebit_loss(s, t, y, h_s, h_t, alpha=2.0, kd_scale=0.01).item()
    assert out == pytest.approx(0.01 * fkl + 2.0 * 0.08, rel=1e-5)  # last entry dropped ("code")
    assert L.onebit_loss(s, t, y, None, None, alpha=0.0).item() == pytest.approx(fkl)
    with pytest.raises(ValueError):
        L.onebit_loss(s, t, y, None, None, alpha=1.0)


@pytest.mark.parametrize("which", ["code", "all"])
def test_onebit_hidden_term_value_and_gradient_equal_the_per_layer_formula(which):
    """The hidden-state term (computed on all layers stacked) against the paper's sum over
    layers written one layer at a time, value and gradient into every student state."""
    torch.manual_seed(0)
    s, t, y = tensors()
    h_s = [torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    h_t = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(4)]
    got = L.onebit_loss(s, t, y, h_s, h_t, alpha=1.0, kd_scale=0.0, hidden_states=which)
    got_grads = torch.autograd.grad(got, h_s, allow_unused=True)
    n = 3 if which == "code" else 4
    want = sum(((F.normalize(a, dim=-1) - F.normalize(b, dim=-1)) ** 2).sum(-1).mean()
               for a, b in zip(h_s[:n], h_t[:n], strict=True))
    want_grads = torch.autograd.grad(want, h_s[:n])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for g, w in zip(got_grads[:n], want_grads, strict=True):
        torch.testing.assert_close(g.double(), w)
    assert all(g is None or not g.any() for g in got_grads[n:])


def test_registry_uniform_signature_and_unknown_name():
    s, t, y = tensors()
    inputs = ObjectiveInputs(student_logits=s, labels=y, teacher_logits=t)
    assert set(L.LOSSES.names()) >= {"ce", "fkl", "rkl", "jsd", "tlsd", "cakld"}
    assert L.get_loss("cakld")(inputs, gamma=0.0).item() == pytest.approx(
        L.get_loss("fkl")(inputs).item())
    assert L.get_loss("jsd")(inputs, beta=0.5).item() == pytest.approx(L.jsd(s, t, y).item())
    with pytest.raises(HarnessError, match="cakld"):
        L.get_loss("cakdl")
    with pytest.raises(HarnessError, match="gamma"):
        L.get_loss("cakld")(inputs)
    with pytest.raises(ValueError, match="teacher"):
        L.get_loss("rkl")(ObjectiveInputs(student_logits=s, labels=y))


def _autograd_kl(s, t, y, w_rev, w_fwd):
    """The divergences as plain autograd graphs of the formula (what the analytic backward of
    forward_kl / reverse_kl / cakld must reproduce)."""
    logs, logt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    per_pos = 0
    if w_rev:
        per_pos = per_pos + w_rev * L._kl(logs, logt)
    if w_fwd:
        per_pos = per_pos + w_fwd * L._kl(logt, logs)
    mask = (y != -100).double()
    return (per_pos * mask).sum(-1).mean()


@pytest.mark.parametrize("name,w_rev,w_fwd", [("fkl", 0.0, 1.0), ("rkl", 1.0, 0.0),
                                              ("cakld", 0.3, 0.7)])
def test_kl_gradients_equal_the_autograd_graph(name, w_rev, w_fwd):
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3
    # A token the teacher rules out: 0 log 0 in KL(T || S); KL(S || T) is then infinite, so the
    # directions with a reverse term get a teacher that nearly rules it out instead.
    t[0, 1, 4] = float("-inf") if name == "fkl" else -200.0
    # A token the student rules out (q = 0: 0 log 0 in KL(S || T); KL(T || S) is infinite
    # there, so the directions with a forward term get an underflowing logit instead).
    s.data[0, 2, 3] = float("-inf") if name == "rkl" else -800.0
    y = torch.randint(0, 11, (3, 5), generator=gen)
    y[1, 2] = y[2, 0] = -100
    fn = {"fkl": L.forward_kl, "rkl": L.reverse_kl,
          "cakld": lambda a, b, c: L.cakld(a, b, c, gamma=0.3)}[name]
    ours = fn(s, t, y)
    (g_ours,) = torch.autograd.grad(ours, s)
    # Autograd's log_softmax backward turns a -inf logit into NaN for the whole position; the
    # limit is the gradient at an underflowing logit, which gives the same probabilities.
    s_ref = s.detach().nan_to_num(neginf=-800.0).requires_grad_()
    ref = _autograd_kl(s_ref, t, y, w_rev, w_fwd)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.isfinite(g_ours).all()
    assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert (g_ours[1, 2] == 0).all() and (g_ours[2, 0] == 0).all()  # masked positions


def test_kl_gradient_reaches_the_teacher_when_it_requires_grad():
    s = torch.randn(2, 3, 7, requires_grad=True)
    t = torch.randn(2, 3, 7, requires_grad=True)
    L.cakld(s, t, None, gamma=0.4).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_bf16_student_logits_get_a_bf16_gradient():
    s = torch.randn(2, 3, 7).bfloat16().requires_grad_()
    t = torch.randn(2, 3, 7).bfloat16()
    L.forward_kl(s, t, None).backward()
    assert s.grad.dtype == torch.bfloat16
