import math

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.eval.ppl import perplexity


class Uniform(nn.Module):
    """Predicts a uniform distribution: PPL must equal the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab) + self.p
        return type("Out", (), {"logits": logits})


def test_uniform_model_has_vocab_size_ppl():
    res = perplexity(Uniform(50), torch.randint(0, 50, (1000,)), seq_len=100)
    assert res.windows == 10 and res.tokens == 1000 and res.predicted == 990
    assert res.ppl == pytest.approx(50, rel=1e-6)


def test_windows_are_non_overlapping_and_tail_dropped():
    res = perplexity(Uniform(7), torch.randint(0, 7, (250,)), seq_len=100)
    assert res.windows == 2 and res.tokens == 200


def test_max_tokens_caps():
    res = perplexity(Uniform(7), torch.randint(0, 7, (1000,)), seq_len=100, max_tokens=300)
    assert res.windows == 3


def test_matches_hf_loss_on_tiny(tiny):
    model, tok = tiny
    ids = torch.randint(0, 1000, (256,))
    res = perplexity(model, ids, seq_len=128)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in ids.view(2, 128)]
    assert res.nll == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    assert math.isclose(res.ppl, math.exp(res.nll))


def test_too_short_is_an_error():
    with pytest.raises(HarnessError, match="fewer than one window"):
        perplexity(Uniform(5), torch.randint(0, 5, (10,)), seq_len=100)


def test_forwards_build_no_kv_cache(tiny_copy, monkeypatch):
    """PPL and training call the model with use_cache=False (transformers otherwise fills a
    cache nobody reads: ops and memory per layer); models without a cache get no such flag."""
    from harness.models import no_cache
    from harness.train.trainer import _forward

    model, _ = tiny_copy  # the hook must not stay on the shared model
    assert no_cache(Uniform(5)) == {}
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (kwargs.get("use_cache"), out.past_key_values)), with_kwargs=True)
    ids = torch.randint(0, 1000, (256,))
    perplexity(model, ids, seq_len=128)
    _forward(model, ids.view(2, 128), hidden=True)
    assert seen == [(False, None)] * 3
    with torch.no_grad():  # what the flag saves: a cache is built by default
        assert model(ids[None, :8]).past_key_values is not None
