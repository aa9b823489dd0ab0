"""GPTQ: error-compensating post-training quantization on calibration Hessians.

Layer by layer (the paper's sequential protocol, as the reference's ``llama_sequential``): the
calls of the first decoder block are recorded once for all calibration batches (hidden states
and the model's own keyword arguments: attention mask, position embeddings...), the model's
forward stopped there. Then for each block: the inputs of its linears on the recorded calls give
``H = 2 X^T X / n`` per linear, GPTQ (``harness.quant.gptq``) replaces each latent weight by its
quantized W_q, and the block, now quantized, runs again on the same calls; its outputs are the
next block's hidden states. About 2L block forwards per batch, no model-specific plumbing: the
blocks are called with exactly what the model passed the first one.

Models whose blocks get different arguments (per-layer attention masks, ``config.layer_types``
with sliding-window layers) have every block's call recorded instead, in one forward stopped
after the last block.

The quantized block runs with W_q itself, what the stored model computes with; the latent
weight written afterwards differs from W_q only for ternary absmean (``latent_for_storage``),
whose later blocks the former full-forward implementation calibrated on the latent instead.

RTN's prepare/finalize then store the result: W_q is a fixed point of the format's quantizer,
so the stored model is an ordinary quantized model of the format.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from harness.api import Needs
from harness.errors import HarnessError
from harness.quant.gptq import accumulate_hessian, gptq_quantize, latent_for_storage, output_error
from harness.quant.modules import decoder_blocks, decoder_linear_names
from harness.registry import register_method
from methods.blockwise import Call, capture_calls, hidden_of, run_block, with_hidden
from methods.clip import split_layer_name
from methods.rtn import RTN
from methods.weightquant import CalibratedConfig, IntDefaultConfig

log = logging.getLogger(__name__)

class GPTQConfig(IntDefaultConfig, CalibratedConfig):
    """The paper calibrates on 128 x 2048 tokens; the harness's default blocks are smaller."""

    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    damp: float = Field(0.01, gt=0, description="fraction of mean(diag H) added to H's diagonal")
    act_order: bool = Field(False, description="quantize columns by descending diag(H) "
                            "(groups stay static and contiguous)")



def check_calibration(in_features, config: GPTQConfig) -> None:
    """Refuses calibration with fewer tokens than the widest quantized linear has inputs
    (``in_features``: those linears' input sizes): its ``H = 2 X^T X / n`` would be
    rank-deficient, GPTQ's updates then set by the damping."""
    widest = max(in_features, default=0)
    tokens = config.calib_samples * config.calib_seq_len
    if tokens < widest:
        raise HarnessError(
            f"gptq needs at least {widest} calibration tokens (the widest quantized layer's "
            f"inputs) for a full-rank Hessian, got calib_samples*calib_seq_len = "
            f"{config.calib_samples}*{config.calib_seq_len} = {tokens}; raise calib_samples "
            f"or calib_seq_len")


@torch.no_grad()
def block_hessians(block: nn.Module, names: dict[str, nn.Module],
                   calls: list[Call]) -> dict[str, torch.Tensor | None]:
    """H of each named linear of ``block`` on the recorded calls (``None``: never reached)."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in names}

    def hook(name):
        def fn(_mod, args, _out):
            acc[name] = accumulate_hessian(*acc[name], args[0])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in names.items()]
    try:
        run_block(block, calls)
    finally:
        for h in handles:
            h.remove()
    return {n: h for n, (h, _) in acc.items()}


@torch.no_grad()
def quantize_linears(linears: dict[str, nn.Module], hessians: dict[str, torch.Tensor | None],
                     fmt, config: GPTQConfig, ctx) -> dict[str, torch.Tensor]:
    """GPTQ of each linear on its H: sets its weight to W_q (what the quantized model computes
    with), records RTN's and GPTQ's output errors, and returns the latent weight to store per
    linear (W_q itself but for ternary absmean)."""
    latents = {}
    for name, linear in linears.items():
        h = hessians[name]
        if h is None:  # a linear the forward never reached (e.g. an unused expert)
            continue
        w = linear.weight.data
        res = gptq_quantize(w, h.to(w.device), fmt, block_size=config.block_size,
                            damp=config.damp, act_order=config.act_order)
        layer, module = split_layer_name(name)
        rtn = fmt.fake_quantize(w.float(), scale_dtype=torch.float16)
        ctx.recorder.layer_stat(layer, module, "rtn_output_err", output_error(w, rtn, h))
        ctx.recorder.layer_stat(layer, module, "gptq_output_err", output_error(w, res.weight, h))
        latent = latent_for_storage(res.weight, fmt)
        stored = fmt.fake_quantize(latent, scale_dtype=torch.float16)
        mismatch = float((stored - res.weight).abs().max())
        if mismatch > 0:  # ternary absmean can miss by an fp16 ulp of its scale
            log.warning("%s: stored weight differs from GPTQ's by up to %.3g", name, mismatch)
        linear.weight.data.copy_(res.weight.to(w.dtype))
        latents[name] = latent.to(w.dtype)
    return latents


@torch.no_grad()
def gptq_model(model, config: GPTQConfig, ctx) -> None:
    """Replaces every decoder linear's latent weight by its GPTQ W_q, block by block."""
    fmt = config.qformat().format()
    names = decoder_linear_names(model)
    modules = dict(model.named_modules())
    check_calibration({modules[n].in_features for n in names}, config)
    batches = ctx.calibration()
    blocks = decoder_blocks(model, "gptq")
    calls = capture_calls(model, [b for _, b in blocks], batches)
    hidden = [hidden_of(c) for c in calls[0]]
    for (block_name, block), block_calls in tqdm(list(zip(blocks, calls, strict=True)),
                                                 desc="gptq", unit="layer", leave=False):
        block_calls = [with_hidden(c, x) for c, x in zip(block_calls, hidden, strict=True)]
        mine = {n: modules[n] for n in names if n.startswith(block_name + ".")}
        hessians = block_hessians(block, mine, block_calls)
        latents = quantize_linears(mine, hessians, fmt, config, ctx)
        hidden = run_block(block, block_calls)  # the next block's inputs, this one quantized
        for name, latent in latents.items():
            mine[name].weight.data.copy_(latent)


@register_method("gptq")
class GPTQ(RTN):
    """GPTQ: column-wise quantization with Hessian error feedback, sequential over layers."""

    citation = ("Frantar et al. 2022, GPTQ: Accurate Post-Training Quantization for Generative "
                "Pre-trained Transformers, arXiv 2210.17323")

    Config = GPTQConfig

    def needs(self):
        return Needs(calibration=self.config.calibration())

    def check_shapes(self, in_features):
        check_calibration(in_features, self.config)

    def init_weights(self, model, ctx):
        """The latent weights are GPTQ's W_q (RTN's prepare then stores them; the trained
        methods' ``init=gptq`` starts from them)."""
        gptq_model(model, self.config, ctx)
