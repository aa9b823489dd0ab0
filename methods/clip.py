"""Clip: RTN after BitDistiller's asymmetric clipping search (AWQ-style auto-clip).

For each decoder linear, calibration inputs X of that layer pick per output group the
[min*(1-a), max*(1-b)] range minimising ||X W^T - X Q(clamp W)^T||^2; the latent weight is
clamped once, then quantized as RTN does. As in the reference, q_proj and k_proj are left
unclipped unless ``skip_qk=false``.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from tqdm.auto import tqdm

from harness.api import Needs
from harness.models import no_cache
from harness.quant.clip import clip_search, reference_skips
from harness.quant.modules import decoder_linear_names
from harness.registry import register_method
from methods.rtn import RTN
from methods.weightquant import CalibratedConfig

log = logging.getLogger(__name__)


class ClipConfig(CalibratedConfig):
    clip: bool = Field(True, description="run the clipping search before quantizing")
    skip_qk: bool = Field(True, description="leave q_proj/k_proj (every layer the reference's "
                          "autoclip.py skips) at plain RTN; false clips every layer")
    clip_tokens: int = Field(512, ge=16, description="tokens sampled per layer for the search")
    clip_grid: int = Field(20, ge=2, description="shrink steps (reference: 20 over [0, 0.5))")
    clip_max_shrink: float = Field(0.5, gt=0, lt=1)


@torch.no_grad()
def capture_inputs(model, names: list[str], batches: torch.Tensor, n_tokens: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """Inputs of each named linear on the calibration batches, ``n_tokens`` rows sampled.

    Keeping a fixed random subset per layer bounds memory (a full capture of SmolLM2 would be
    several GB) while giving the search the same tokens the reference samples.
    """
    modules = dict(model.named_modules())
    total = batches.numel()
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_tokens]
    idx = idx.sort().values
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    offsets = {"pos": 0}

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1])
            lo = offsets["pos"]
            sel = idx[(idx >= lo) & (idx < lo + x.size(0))] - lo
            captured[name].append(x[sel.to(x.device)].float().cpu())
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    kwargs = no_cache(model)
    try:
        for row in batches:
            model(row.unsqueeze(0).to(device), **kwargs)
            offsets["pos"] += row.numel()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in captured.items()}


def clip_model(model, config: ClipConfig, ctx) -> None:
    """Clamps every decoder linear's weight in place at its searched range; logs layer stats."""
    names = decoder_linear_names(model)
    inputs = capture_inputs(model, names, ctx.calibration(), config.clip_tokens, ctx.spec.seed)
    modules = dict(model.named_modules())
    qformat = config.qformat()
    for name in tqdm(names, desc="clip search", unit="layer", leave=False):
        layer, module = split_layer_name(name)
        linear = modules[name]
        if config.skip_qk and reference_skips(module):
            continue
        res = clip_search(linear.weight.data, inputs[name].to(linear.weight.device), qformat,
                          n_grid=config.clip_grid, max_shrink=config.clip_max_shrink,
                          n_tokens=config.clip_tokens, seed=ctx.spec.seed)
        linear.weight.data.copy_(res.weight)
        ctx.recorder.layer_stat(layer, module, "rtn_output_mse", res.err_before)
        ctx.recorder.layer_stat(layer, module, "clip_output_mse", res.err_after)


def split_layer_name(name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``layers.3``, ``q_proj``)."""
    parts = name.split(".")
    i = parts.index("layers") if "layers" in parts else 0
    return ".".join(parts[i : i + 2]), parts[-1]


@register_method("clip")
class Clip(RTN):
    """RTN after the asymmetric clipping search on calibration activations."""

    citation = ("BitDistiller's asymmetric clipping (Du et al. 2024, arXiv 2402.10631), after AWQ's "
                "auto-clip (Lin et al. 2023, arXiv 2306.00978)")

    Config = ClipConfig

    def needs(self):
        if not self.config.clip:
            return Needs()
        return Needs(calibration=self.config.calibration())

    def init_weights(self, model, ctx):
        if self.config.clip:
            clip_model(model, self.config, ctx)
