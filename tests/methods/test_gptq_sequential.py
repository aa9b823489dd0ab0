"""methods/gptq.py's sequential protocol against the full-forward one it replaced.

The oracle is the former implementation: each block's Hessians from a forward of the whole
model (earlier blocks already quantized) stopped after that block, ~L^2/2 block forwards. The
sequential one records the first block's calls once and runs each block twice (Hessians, then
its quantized outputs for the next block): the same Hessians, ~2L block forwards.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from harness.api import NullRecorder, RunContext
from harness.models import no_cache
from harness.quant.gptq import accumulate_hessian
from harness.quant.modules import decoder_blocks, decoder_linear_names
from methods.blockwise import run_block
from methods.gptq import GPTQConfig, gptq_model, quantize_linears

LAYERS, SAMPLES, SEQ = 5, 3, 32


class _Stop(Exception):
    pass


@torch.no_grad()
def _full_forward_hessians(model, block, names, batches):
    """The former ``layer_hessians``: the whole model's forward, stopped after ``block``."""
    modules = dict(model.named_modules())
    acc = {n: (None, 0) for n in names}

    def hook(name):
        def fn(_mod, args, _out):
            acc[name] = accumulate_hessian(*acc[name], args[0])
        return fn

    def stop(_mod, _args, _out):
        raise _Stop

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    handles.append(block.register_forward_hook(stop))
    try:
        for row in batches:
            with contextlib.suppress(_Stop):
                model(row.unsqueeze(0), **no_cache(model))
    finally:
        for h in handles:
            h.remove()
    return {n: h for n, (h, _) in acc.items()}


@torch.no_grad()
def _full_forward_gptq(model, config, ctx):
    """The former ``gptq_model`` (the quantization step shared with the new one)."""
    fmt = config.qformat().format()
    batches = ctx.calibration()
    names = decoder_linear_names(model)
    modules = dict(model.named_modules())
    for block_name, block in decoder_blocks(model, "gptq"):
        mine = {n: modules[n] for n in names if n.startswith(block_name + ".")}
        hessians = _full_forward_hessians(model, block, list(mine), batches)
        for name, latent in quantize_linears(mine, hessians, fmt, config, ctx).items():
            mine[name].weight.data.copy_(latent)


class _Stats(NullRecorder):
    def __init__(self):
        self.stats = {}

    def layer_stat(self, layer, module, stat, value):
        self.stats[(layer, module, stat)] = value


def _ctx(batches, recorder=None):
    spec = type("Spec", (), {"seed": 0})()
    return RunContext(spec=spec, device=torch.device("cpu"), tokenizer=None,
                      recorder=recorder or NullRecorder(), run_dir=None,
                      calibration=lambda: batches)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _qwen2_sliding():
    """Blocks called with different masks (two full-attention, three sliding-window layers)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      use_sliding_window=True, sliding_window=8, max_window_layers=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    assert len(set(model.config.layer_types)) == 2
    return model


def _batches():
    return torch.randint(0, 256, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


def _count_block_calls(model):
    counts = [0] * len(decoder_blocks(model, "gptq"))
    handles = []
    for i, (_, block) in enumerate(decoder_blocks(model, "gptq")):
        def fn(_mod, _args, _out, i=i):
            counts[i] += 1
        handles.append(block.register_forward_hook(fn))
    return counts, handles


@pytest.mark.parametrize("build, act_order", [(_llama, False), (_llama, True),
                                               (_qwen2_sliding, False)],
                         ids=["llama", "llama-act-order", "qwen2-sliding"])
def test_sequential_equals_full_forward(build, act_order):
    import copy

    model = build()
    old_model = copy.deepcopy(model)
    batches = _batches()
    config = GPTQConfig(bits=3, group_size=32, act_order=act_order)
    new_stats, old_stats = _Stats(), _Stats()

    counts, handles = _count_block_calls(model)
    gptq_model(model, config, _ctx(batches, new_stats))
    for h in handles:
        h.remove()
    old_counts, handles = _count_block_calls(old_model)
    _full_forward_gptq(old_model, config, _ctx(batches, old_stats))
    for h in handles:
        h.remove()

    names = decoder_linear_names(model)
    assert len(names) == 7 * LAYERS
    new, old = dict(model.named_parameters()), dict(old_model.named_parameters())
    for name in names:
        w_new, w_old = new[f"{name}.weight"], old[f"{name}.weight"]
        assert not torch.equal(w_new, _orig(build, name))  # quantized at all
        # the same Hessians up to float rounding: at most an element at a grid midpoint flips
        close = torch.isclose(w_new, w_old, rtol=0, atol=1e-6)
        assert close.float().mean() >= 0.999, name
    assert set(new_stats.stats) == set(old_stats.stats)
    for key, value in new_stats.stats.items():
        assert value == pytest.approx(old_stats.stats[key], rel=1e-4, abs=1e-9), key

    # block forwards: L(L+1)/2 per batch before, 2 per block and batch now (the recording of
    # the first block's calls stops before it runs; per-layer masks add one stopped forward)
    extra = LAYERS if build is _qwen2_sliding else 0
    assert sum(old_counts) == SAMPLES * LAYERS * (LAYERS + 1) // 2
    assert sum(counts) == SAMPLES * (2 * LAYERS + extra)
    assert counts[1:] == [SAMPLES * (2 + (extra > 0))] * (LAYERS - 1)


_ORIG = {}


def _orig(build, name):
    if build not in _ORIG:
        _ORIG[build] = {n: p.detach().clone() for n, p in build().named_parameters()}
    return _ORIG[build][f"{name}.weight"]


def test_blocks_returning_tuples_or_tensors():
    """transformers' decoder layers return a tensor (>= 4.56) or a tuple (before)."""

    class TupleBlock(nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return (hidden_states * scale, None)

    class TensorBlock(nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return hidden_states * scale

    x = torch.randn(1, 4, 8)
    for block in (TupleBlock(), TensorBlock()):
        [out] = run_block(block, [((x,), {"scale": 2.0})])
        assert torch.equal(out, 2 * x)
        [out] = run_block(block, [((), {"hidden_states": x, "scale": 3.0})])
        assert torch.equal(out, 3 * x)
