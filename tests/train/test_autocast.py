"""A frozen teacher's linears held in autocast's dtype give the same outputs with fewer casts."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.train.autocast import frozen_linears_in


class _Casts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "_to_copy"
        return func(*args, **(kwargs or {}))


def _forward(model, ids):
    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16)
    with torch.no_grad(), amp, _Casts() as casts:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out, casts.count


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_same_outputs_fewer_casts_and_model_restored(tiny_copy, device):
    model, _ = tiny_copy
    model.to(device)
    model.requires_grad_(False)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as SmolLM2's
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 24), device=device)
    plain, plain_casts = _forward(model, ids)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with frozen_linears_in(model, torch.bfloat16) as n_cast:
        assert model.lm_head.weight.dtype == torch.float32  # tied to the embedding: kept
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        cast, cast_casts = _forward(model, ids)
    assert n_cast == len(linears) - 1  # every decoder linear (no biases here), not lm_head
    assert torch.equal(cast.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(cast.hidden_states, plain.hidden_states,
                                                  strict=True))
    assert plain_casts - cast_casts == n_cast  # one weight cast per linear per forward saved
    assert dict(model.named_parameters()).keys() == params.keys()
    for n, p in model.named_parameters():
        assert p is params[n] and p.dtype == torch.float32 and torch.equal(p, before[n]), n
        assert p.device.type == device, n


def test_trainable_linears_and_no_autocast_are_left_alone(tiny_copy):
    model, _ = tiny_copy
    with frozen_linears_in(model, torch.bfloat16) as n_cast:  # every weight trainable
        assert n_cast == 0
    model.requires_grad_(False)
    with frozen_linears_in(model, None) as n_cast, frozen_linears_in(None, torch.bfloat16) as m:
        assert n_cast == m == 0
        assert all(p.dtype == torch.float32 for p in model.parameters())
