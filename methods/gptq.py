"""GPTQ: error-compensating post-training quantization on calibration Hessians.

Layer by layer (the paper's sequential protocol): the calibration batches run through the model
with every earlier decoder layer already quantized, the inputs of this layer's linears give
``H = 2 X^T X / n`` per linear, and GPTQ (``harness.quant.gptq``) replaces each latent weight
by its quantized W_q. RTN's prepare/finalize then store it: W_q is a fixed point of the format's
quantizer, so the stored model is an ordinary quantized model of the format.

Each layer's inputs come from a forward of the whole model stopped after that layer: no model-
specific plumbing (masks, rotary embeddings), at the cost of ~L^2/2 layer forwards.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from tqdm.auto import tqdm

from harness.api import Needs
from harness.models import no_cache
from harness.quant.gptq import accumulate_hessian, gptq_quantize, latent_for_storage, output_error
from harness.quant.modules import decoder_blocks, decoder_linear_names
from harness.registry import register_method
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


class _Stop(Exception):
    """Ends a calibration forward once the layer of interest has run."""




@torch.no_grad()
def layer_hessians(model, block: torch.nn.Module, names: list[str],
                   batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """H of each named linear of ``block`` on the calibration batches, the model as it is now
    (earlier blocks already quantized)."""
    modules = dict(model.named_modules())
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in names}

    def hook(name):
        def fn(_mod, args, _out):
            acc[name] = accumulate_hessian(*acc[name], args[0])
        return fn

    def stop(_mod, _args, _out):
        raise _Stop

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    handles.append(block.register_forward_hook(stop))
    device = next(model.parameters()).device
    kwargs = no_cache(model)
    try:
        for row in batches:
            try:
                model(row.unsqueeze(0).to(device), **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: h for n, (h, _) in acc.items()}


def gptq_model(model, config: GPTQConfig, ctx) -> None:
    """Replaces every decoder linear's latent weight by its GPTQ W_q, block by block."""
    fmt = config.qformat().format()
    batches = ctx.calibration()
    names = decoder_linear_names(model)
    modules = dict(model.named_modules())
    for block_name, block in tqdm(decoder_blocks(model, "gptq"), desc="gptq", unit="layer",
                                  leave=False):
        mine = [n for n in names if n.startswith(block_name + ".")]
        hessians = layer_hessians(model, block, mine, batches)
        for name in mine:
            linear = modules[name]
            h = hessians[name]
            if h is None:  # a linear the forward never reached (e.g. an unused expert)
                continue
            w = linear.weight.data
            res = gptq_quantize(w, h.to(w.device), fmt, block_size=config.block_size,
                                damp=config.damp, act_order=config.act_order)
            layer, module = split_layer_name(name)
            rtn = fmt.fake_quantize(w.float(), scale_dtype=torch.float16)
            ctx.recorder.layer_stat(layer, module, "rtn_output_err", output_error(w, rtn, h))
            ctx.recorder.layer_stat(layer, module, "gptq_output_err",
                                    output_error(w, res.weight, h))
            latent = latent_for_storage(res.weight, fmt)
            stored = fmt.fake_quantize(latent, scale_dtype=torch.float16)
            mismatch = float((stored - res.weight).abs().max())
            if mismatch > 0:  # ternary absmean can miss by an fp16 ulp of its scale
                log.warning("%s: stored weight differs from GPTQ's by up to %.3g", name,
                            mismatch)
            linear.weight.data.copy_(latent.to(w.dtype))


@register_method("gptq")
class GPTQ(RTN):
    """GPTQ: column-wise quantization with Hessian error feedback, sequential over layers."""

    Config = GPTQConfig

    def needs(self):
        return Needs(calibration=self.config.calibration())

    def prepare(self, model, ctx):
        gptq_model(model, self.config, ctx)
        return super().prepare(model, ctx)
