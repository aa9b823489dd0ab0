"""AdamW's weight decay follows Hugging Face's Trainer: biases and norm weights are exempt."""

import torch
from torch import nn

from harness.quant.onebit import OneBitLinear
from harness.train.trainer import no_decay_names, optimizer_groups, trainable_parameters


def _decay_one_step(model, weight_decay):
    """One AdamW step with zero gradients: Adam's update is 0, so only decay moves weights."""
    before = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    opt = torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=0.1,
                            weight_decay=weight_decay)
    for _, p in trainable_parameters(model):
        p.grad = torch.zeros_like(p)
    opt.step()
    return before


def test_norms_keep_their_gains_and_linears_decay(tiny_copy):
    model, _ = tiny_copy
    exempt = no_decay_names(model)
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    assert norms and exempt == norms  # input/post-attention norms of each layer + the final norm
    before = _decay_one_step(model, 0.5)
    for n, p in trainable_parameters(model):
        if n in exempt:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5)), n


def test_onebit_value_vectors_decay_and_biases_do_not():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = OneBitLinear(8, 4, bias=True)
            self.ln = nn.LayerNorm(4)

    block = Block()
    assert no_decay_names(block) == {"proj.bias", "ln.weight", "ln.bias"}
    groups = optimizer_groups(block, 0.01)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(block.proj.weight), id(block.proj.g), id(block.proj.h)}


def test_without_decay_one_group_as_before(tiny_copy):
    """weight_decay 0 (the default but for OneBit) keeps one group: checkpoints written
    before the exemption still load."""
    model, _ = tiny_copy
    groups = optimizer_groups(model, 0.0)
    assert len(groups) == 1
    assert [id(p) for p in groups[0]["params"]] == [id(p) for _, p in trainable_parameters(model)]
