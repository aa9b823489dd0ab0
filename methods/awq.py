"""AWQ: activation-aware scaling, then the clipping search, then RTN (Lin et al. 2023).

Block by block (``methods.blockwise``, as GPTQ: the first block's calls recorded once, then
each block run on its own, its full-precision outputs the next block's inputs), the inputs of
the block's attention, MLP, o_proj and down_proj are captured. For each group of linears sharing an input, ``harness.quant.awq.search_scales`` picks
``s = x_mean ** alpha`` minimising the error of the module that holds the group, as the
reference's ``auto_scale_block`` does: the attention block's output for q/k/v, the MLP's output
for gate/up, the linear's own output for o_proj and down_proj. The scales are folded (norm
weights or the preceding linear's rows divided by ``s``, the linears' input columns multiplied
by it), so the model stays an ordinary one that computes the same function in full precision.
Then ``clip``'s search runs on the scaled weights and RTN stores them: AWQ = scale + clip + RTN.

As in the reference, o_proj is left unscaled when v_proj's outputs are not o_proj's inputs
channel for channel (grouped-query attention: one v head serves several query heads).

Differences from llm-awq: every block is searched on activations of the full-precision (scaled)
model, and the clipping search then captures its inputs in one pass of that model, as ``clip``
does; the reference feeds each block the output of earlier blocks already clipped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from harness.api import Needs
from harness.errors import HarnessError
from harness.quant.awq import (
    activation_mean,
    fold_into_norm,
    fold_into_rows,
    linears_output_error,
    scale_columns,
    search_scales,
)
from harness.quant.modules import decoder_blocks
from harness.registry import register_method
from methods.blockwise import Call, capture_calls, hidden_of, run_block, with_hidden
from methods.clip import Clip, ClipConfig, split_layer_name
from methods.weightquant import IntDefaultConfig

log = logging.getLogger(__name__)

#: The submodules of a llama-style decoder block that AWQ's four groups use.
LLAMA_PARTS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
               "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")


class AWQConfig(IntDefaultConfig, ClipConfig):
    """ClipConfig's fields (the clipping search is AWQ's second half and ``clip_model`` reads
    them) with the post-training papers' INT default (IntDefaultConfig: the AWQ paper
    quantizes to INT at every width, not the ladder's NF3 at 3 bits)."""

    awq_grid: int = Field(20, ge=1, description="scale exponents tried, alpha = i / awq_grid "
                          "(reference 20; 1 = alpha 0 only, i.e. plain clip)")





def check_llama_block(name: str, block: nn.Module) -> None:
    """Raises a one-line error naming the first AWQ part a block lacks."""
    for part in LLAMA_PARTS:
        try:
            block.get_submodule(part)
        except AttributeError:
            raise HarnessError(f"awq needs llama-style decoder blocks ({', '.join(LLAMA_PARTS)}); "
                               f"{name} has no {part}: use clip or gptq for this model") from None


@dataclass
class BlockInputs:
    """What one block saw on the calibration batches: the (args, kwargs) of each call of its
    attention and MLP (to run them again), and the inputs of o_proj and down_proj."""

    attn_calls: list[tuple[tuple, dict]] = field(default_factory=list)
    mlp_calls: list[tuple[tuple, dict]] = field(default_factory=list)
    o_inputs: list[torch.Tensor] = field(default_factory=list)
    down_inputs: list[torch.Tensor] = field(default_factory=list)


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with (positionally or as ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_block(block: nn.Module, calls: list[Call]) -> BlockInputs:
    """Runs ``block`` on its recorded calls and records its modules' inputs."""
    got = BlockInputs()

    def call(store):
        def fn(_mod, args, kwargs):
            store.append((args, dict(kwargs)))
        return fn

    def linear_in(store):
        def fn(_mod, args):
            store.append(args[0])
        return fn

    handles = [
        block.get_submodule("self_attn").register_forward_pre_hook(call(got.attn_calls),
                                                                   with_kwargs=True),
        block.get_submodule("mlp").register_forward_pre_hook(call(got.mlp_calls),
                                                             with_kwargs=True),
        block.get_submodule("self_attn.o_proj").register_forward_pre_hook(linear_in(got.o_inputs)),
        block.get_submodule("mlp.down_proj").register_forward_pre_hook(
            linear_in(got.down_inputs)),
    ]
    try:
        run_block(block, calls)
    finally:
        for h in handles:
            h.remove()
    return got


def replay(module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The module's outputs on recorded calls (the first element of a tuple output)."""
    outs = []
    for args, kwargs in calls:
        out = module(*args, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).float())
    return outs


@contextlib.contextmanager
def swapped_weights(linears: list[nn.Linear], weights: list[torch.Tensor]) -> Iterator[None]:
    """The linears hold ``weights`` inside the block, their own weights again after it."""
    saved = [lin.weight.data for lin in linears]
    try:
        for lin, w in zip(linears, weights, strict=True):
            lin.weight.data = w.to(device=lin.weight.device, dtype=lin.weight.dtype)
        yield
    finally:
        for lin, w in zip(linears, saved, strict=True):
            lin.weight.data = w


def module_loss(module: nn.Module, calls, linears: list[nn.Linear]):
    """The reference's block loss: mean squared difference of ``module``'s outputs from its
    full-precision outputs on the recorded calls, with the linears holding candidate weights."""
    reference = replay(module, calls)
    count = sum(r.numel() for r in reference)

    def loss(candidates: list[torch.Tensor]) -> float:
        with swapped_weights(linears, candidates):
            outs = replay(module, calls)
        return sum(float((o - r).pow(2).sum()) for o, r in zip(outs, reference,
                                                                strict=True)) / count
    return loss


@torch.no_grad()
def awq_scale_model(model: nn.Module, config: AWQConfig, ctx) -> dict[str, float]:
    """Searches and folds the AWQ scales of every decoder block in place; returns the chosen
    alpha per group (named by the group's first linear) and logs them as layer stats."""
    fmt = config.qformat().format()
    batches = ctx.calibration()
    blocks = decoder_blocks(model, "awq")
    for name, block in blocks:
        check_llama_block(name, block)
    chosen: dict[str, float] = {}
    calls = capture_calls(model, [b for _, b in blocks], batches)
    hidden = [hidden_of(c) for c in calls[0]]
    for (block_name, block), block_calls in tqdm(list(zip(blocks, calls, strict=True)),
                                                 desc="awq scales", unit="layer", leave=False):
        block_calls = [with_hidden(c, x) for c, x in zip(block_calls, hidden, strict=True)]
        got = capture_block(block, block_calls)
        part = block.get_submodule
        attn, mlp = part("self_attn"), part("mlp")
        q, k, v, o = (part(f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (part(f"mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
        x_attn = torch.cat([first_input(*c).reshape(-1, q.in_features) for c in got.attn_calls])
        x_mlp = torch.cat([first_input(*c).reshape(-1, gate.in_features) for c in got.mlp_calls])
        x_o = torch.cat([x.reshape(-1, o.in_features) for x in got.o_inputs])
        x_down = torch.cat([x.reshape(-1, down.in_features) for x in got.down_inputs])

        # (prev op, linears, input, loss); every search runs on the block as it was captured,
        # as the reference's does; the folds commute (v_proj and up_proj get columns and rows scaled).
        groups: list[tuple[nn.Module, list[nn.Linear], torch.Tensor, object]] = [
            (part("input_layernorm"), [q, k, v], x_attn, module_loss(attn, got.attn_calls,
                                                                     [q, k, v])),
            (part("post_attention_layernorm"), [gate, up], x_mlp,
             module_loss(mlp, got.mlp_calls, [gate, up])),
        ]
        if v.out_features == o.in_features:  # else GQA repeats v heads: the reference skips
            groups.append((v, [o], x_o, None))
        groups.append((up, [down], x_down, None))

        results = []
        for prev, linears, x, loss in groups:
            weights = [lin.weight.data for lin in linears]
            if loss is None:  # a lone linear: its own output is the module's output
                x_f = x.float()
                def loss(cands, x_f=x_f, weights=weights):
                    return linears_output_error(x_f, weights, cands)
            res = search_scales(activation_mean(x), weights, fmt, loss, n_grid=config.awq_grid)
            results.append((prev, linears, res))
        for prev, linears, res in results:
            fold(prev, linears, res.scales)
            first = next(n for n, m in block.named_modules() if m is linears[0])
            layer, first = split_layer_name(f"{block_name}.{first}")
            ctx.recorder.layer_stat(layer, first, "awq_alpha", res.alpha)
            ctx.recorder.layer_stat(layer, first, "awq_plain_err", res.err_plain)
            ctx.recorder.layer_stat(layer, first, "awq_scaled_err", res.err_best)
            chosen[f"{block_name}.{first}"] = res.alpha
        del got
        # the next block's inputs: the folds keep this block's full-precision function
        hidden = run_block(block, block_calls)
    return chosen


def fold(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Divides ``prev``'s output by ``s`` and multiplies the linears' input columns by it."""
    bias = getattr(prev, "bias", None)
    if isinstance(prev, nn.Linear):
        w, b = fold_into_rows(prev.weight.data, bias.data if bias is not None else None, scales)
    else:
        w, b = fold_into_norm(prev.weight.data, bias.data if bias is not None else None, scales)
    prev.weight.data.copy_(w)
    if b is not None:
        bias.data.copy_(b)
    for lin in linears:
        lin.weight.data.copy_(scale_columns(lin.weight.data, scales))


@register_method("awq")
class AWQ(Clip):
    """AWQ: activation-aware per-channel scaling, the clipping search, then RTN."""

    citation = ("Lin et al. 2023, AWQ: Activation-aware Weight Quantization for LLM Compression and "
                "Acceleration, arXiv 2306.00978")

    Config = AWQConfig

    def needs(self):
        # The scale search reads calibration even with clip=false.
        return Needs(calibration=self.config.calibration())

    def init_weights(self, model, ctx):
        awq_scale_model(model, self.config, ctx)
        super().init_weights(model, ctx)  # the clipping search on the scaled weights
