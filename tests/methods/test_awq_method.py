"""The awq method: config and needs, the fold on tiny-llama, grid 1 = clip, a CLI run."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.api import Calibration, NullRecorder, RunContext
from harness.errors import HarnessError
from harness.models import no_cache, tiny_llama_config
from harness.orchestration.plan import build_spec
from harness.quant.linear import QuantLinear
from harness.registry import build_method
from methods.awq import awq_scale_model


def _method(name, **over):
    return build_method(build_spec("tiny-llama", name, over, "quick"))


def _ctx(vocab, samples=2, seq=32):
    gen = torch.Generator().manual_seed(0)
    batches = torch.randint(0, vocab, (samples, seq), generator=gen)
    spec = type("Spec", (), {"seed": 0})()
    return RunContext(spec=spec, device=torch.device("cpu"), tokenizer=None,
                      recorder=NullRecorder(), run_dir=None, calibration=lambda: batches)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, **no_cache(model)).logits


def test_config_and_needs():
    awq = _method("awq")
    assert awq.config.fmt == "int" and awq.config.awq_grid == 20 and awq.config.clip
    assert awq.needs().calibration == Calibration()
    assert _method("awq", clip=False, calib_samples=4, calib_seq_len=64).needs().calibration \
        == Calibration(4, 64)
    assert _method("awq", fmt="nf3").config.fmt == "nf3"
    with pytest.raises(Exception, match="awq_grid"):
        _method("awq", awq_grid=0)


def _mha_llama():
    """tiny-llama with as many kv heads as query heads: v_proj feeds o_proj channel for channel."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(256)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mha", [False, True], ids=["gqa", "mha"])
def test_fold_keeps_fp_logits(tiny_copy, mha):
    model = _mha_llama() if mha else tiny_copy[0]
    vocab = model.config.vocab_size
    original = copy.deepcopy(model)
    ctx = _ctx(vocab)
    chosen = awq_scale_model(model, _method("awq", bits=3, group_size=32).config, ctx)
    assert any(a > 0 for a in chosen.values())  # the fold is exercised, not s = 1 everywhere
    # o_proj is scaled only where v_proj's rows are its inputs (the reference skips GQA)
    assert any(k.endswith("o_proj") for k in chosen) == mha
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, original.get_parameter(n))]
    assert any("input_layernorm" in n for n in changed)
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(model, tokens), _logits(original, tokens),
                               atol=1e-5, rtol=0)


def test_grid_one_is_clip(tiny):
    model, _ = tiny
    ctx = _ctx(model.config.vocab_size)
    over = {"bits": 3, "group_size": 32, "clip_tokens": 64}
    awq = _method("awq", awq_grid=1, **over)
    clip = _method("clip", fmt="int", **over)
    a = awq.prepare(copy.deepcopy(model), ctx)
    c = clip.prepare(copy.deepcopy(model), ctx)
    qa = {n: m.dequantized_weight() for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qc = {n: m.dequantized_weight() for n, m in c.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qc.keys() and qa
    for n in qa:
        assert torch.equal(qa[n], qc[n]), n


def test_non_llama_block_is_refused(tiny_copy):
    model = tiny_copy[0]
    del model.model.layers[0].post_attention_layernorm
    with pytest.raises(HarnessError, match="has no post_attention_layernorm"):
        awq_scale_model(model, _method("awq").config, _ctx(model.config.vocab_size))


def test_cli_run_stores_a_ppl(run_quick):
    runs = run_quick("awq")
    assert set(runs) == {"awq"}
    assert runs["awq"]["status"] == "finished" and runs["awq"]["metrics"]["ppl"] > 0


def test_blocks_are_calibrated_one_by_one():
    # each block runs twice per calibration batch (its inputs recorded, then its outputs for
    # the next block): 2L block forwards, not a forward of the model up to every block
    from transformers import LlamaForCausalLM

    from harness.quant.modules import decoder_blocks

    config = tiny_llama_config(256)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    original = copy.deepcopy(model)
    counts = [0] * 4
    for i, (_, block) in enumerate(decoder_blocks(model, "awq")):
        block.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
    ctx = _ctx(256, samples=3)
    cfg = _method("awq", bits=3, group_size=32, calib_samples=3, calib_seq_len=32).config
    awq_scale_model(model, cfg, ctx)
    assert counts == [3 * 2] * 4
    tokens = ctx.calibration()
    torch.testing.assert_close(_logits(model, tokens), _logits(original, tokens), rtol=1e-4,
                               atol=1e-4)
