"""HQQ: calibration-free asymmetric quantization with half-quadratic zero-point optimisation.

Per decoder linear, ``harness.quant.hqq`` runs the reference package's solver (mobiusml/hqq
0.2.8, ``Quantizer.quantize`` with its ``BaseQuantizeConfig`` defaults: lp 0.7, beta 10 held
fixed (kappa 1), 20 rounds with early stop, the starting zero rounded at 4 bits only) and the
codes, fp16 scales and zeros are stored as they are. RTN's path re-derives zero points from a weight's min/max,
which would undo the optimisation, so the layers are built packed here.

Formats:

- ``intfz`` (default): integer codes, fp16 scale and the optimised fractional zero in fp16,
  as the reference stores it (``harness.quant.intfz``; ``bits + 32/g`` bits per weight).
- ``int`` asym: the int-storage variant. ``IntFormat`` stores integer zeros at the code width,
  so the optimised zero is rounded to the integer grid and the codes re-derived; measured, this
  gives RTN's error back (the solver's gain is in the fraction), so it is for comparison.

Layer stats: ``rtn_weight_mse`` (int asym RTN at the same bits and group, the baseline),
``rtn_fz_weight_mse`` (intfz RTN: min/max with the unrounded zero), ``hqq_weight_mse`` (what
is stored) and ``hqq_frac_zero_weight_mse`` (the fractional zero; equal to the stored one for
intfz).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from harness.quant.formats import get_format
from harness.quant.hqq import (
    HQQ_FORMATS,
    hqq_quantize,
    latent_with_pinned_ends,
    pack_qparams,
)
from harness.quant.linear import PackedLinear
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.registry import register_method
from methods.clip import split_layer_name
from methods.rtn import RTN
from methods.weightquant import IntDefaultConfig

_FORMAT_ERROR = ("hqq needs fmt=intfz (fractional zeros, the default) or fmt=int without "
                 "symmetric (it optimises the zero point); drop fmt/symmetric")


class HQQConfig(IntDefaultConfig):
    fmt: str = Field("intfz", description="intfz (fp16 fractional zeros, as the reference "
                     "stores them) or int (asym: the zero rounded to the integer grid)")
    lp_norm: float = Field(0.7, gt=0, le=1, description="p of the lp error (reference 0.7)")
    beta: float = Field(10.0, gt=0, description="initial half-quadratic penalty")
    kappa: float = Field(1.0, ge=1, description="beta's growth per round; 1: the reference's "
                         "default solver, which never grows beta (its opt_params' 1.01 is "
                         "unused there)")
    iters: int = Field(20, ge=1, description="solver rounds (stops early when the error rises)")
    round_zero: bool | None = Field(
        None, description="round the solver's starting zero (-min/s); unset: the reference's "
        "default, at 4 bits only. The optimised zero is fractional either way")

    @model_validator(mode="before")
    @classmethod
    def _paper_format(cls, values):
        # overrides IntDefaultConfig's (same name): HQQ stores fractional zeros by default
        if isinstance(values, dict) and values.get("symmetric"):
            raise ValueError(_FORMAT_ERROR)  # before intfz's own refusal, which points to int
        if isinstance(values, dict) and "fmt" not in values:
            values = dict(values, fmt="intfz")
        return values

    @model_validator(mode="after")
    def _check_hqq_format(self):
        if self.fmt not in HQQ_FORMATS or self.symmetric:
            raise ValueError(_FORMAT_ERROR)
        return self


@register_method("hqq")
class HQQ(RTN):
    """HQQ: asym integer codes with zero points from a half-quadratic lp solver, no
    calibration; fractional fp16 zeros (intfz) by default."""

    citation = ("Badri & Shaji 2023, Half-Quadratic Quantization of Large Machine Learning "
                "Models (Mobius Labs blog post; reference code mobiusml/hqq)")
    Config = HQQConfig

    def quantize_layer(self, name: str, linear, ctx):
        """HQQ of one linear (``harness.quant.hqq.HQQResult``); records its weight errors
        beside int and intfz RTN's."""
        cfg = self.config
        fmt = cfg.qformat().format()
        w = linear.weight.detach()
        res = hqq_quantize(w, fmt, lp_norm=cfg.lp_norm, beta=cfg.beta, kappa=cfg.kappa,
                           iters=cfg.iters, round_zero=cfg.round_zero)
        layer, module = split_layer_name(name)
        wf = w.float()
        rtns = {"rtn_weight_mse": get_format("int", fmt.bits, fmt.group_size),
                "rtn_fz_weight_mse": get_format("intfz", fmt.bits, fmt.group_size)}
        for stat, q in [*((k, f.fake_quantize(wf, scale_dtype=torch.float16))
                          for k, f in rtns.items()),
                        ("hqq_weight_mse", res.weight),
                        ("hqq_frac_zero_weight_mse", res.weight_frac)]:
            ctx.recorder.layer_stat(layer, module, stat, float((wf - q).pow(2).mean()))
        return res

    @torch.no_grad()
    def init_weights(self, model, ctx):
        """As a trained method's start: latent weights whose min/max quantization gives
        HQQ's scales and zeros (each group's two extreme weights moved to the end codes,
        ``latent_with_pinned_ends``); the moved weights' error is recorded."""
        modules = dict(model.named_modules())
        for name in tqdm(decoder_linear_names(model), desc="hqq", unit="layer", leave=False):
            linear = modules[name]
            res = self.quantize_layer(name, linear, ctx)
            latent = latent_with_pinned_ends(res.qparams)
            layer, module = split_layer_name(name)
            ctx.recorder.layer_stat(layer, module, "hqq_pinned_weight_mse",
                                    float((linear.weight.float() - latent).pow(2).mean()))
            linear.weight.data.copy_(latent.to(linear.weight.dtype))

    @torch.no_grad()
    def prepare(self, model, ctx):
        # RTN's path would re-derive zero points from each weight's min/max, undoing the
        # optimisation: the layers are built packed from HQQ's own codes, scales and zeros.
        spec = self.config.qformat()
        fmt = spec.format()

        def build(name, linear):
            res = self.quantize_layer(name, linear, ctx)
            packed = pack_qparams(res.qparams, fmt)
            m = PackedLinear(linear.in_features, linear.out_features, spec,
                             linear.bias is not None, tensors=packed.tensors())
            if linear.bias is not None:
                m.bias.data.copy_(linear.bias.detach())
            return m.to(linear.weight.device)

        names = decoder_linear_names(model)
        for name in tqdm(names, desc="hqq", unit="layer", leave=False):
            replace_linears(model, [name], build)
        return model
