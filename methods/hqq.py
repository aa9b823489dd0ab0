"""HQQ: calibration-free int asym quantization with half-quadratic zero-point optimisation.

Per decoder linear, ``harness.quant.hqq`` optimises each group's zero point (scale from
min/max); the zero is rounded to the int format's integer grid (the format stores integer zero
points) and the codes, scales and zeros are stored as they are. RTN's path re-derives zero points
from a weight's min/max, which would undo the optimisation, so the layers are built packed here.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from harness.quant.hqq import hqq_quantize, pack_qparams
from harness.quant.linear import PackedLinear
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.registry import register_method
from methods.clip import split_layer_name
from methods.rtn import RTN
from methods.weightquant import IntDefaultConfig


class HQQConfig(IntDefaultConfig):
    lp_norm: float = Field(0.7, gt=0, le=1, description="p of the lp error (reference 0.7)")
    beta: float = Field(10.0, gt=0, description="initial half-quadratic penalty")
    kappa: float = Field(1.01, gt=1, description="beta's growth per round")
    iters: int = Field(20, ge=1, description="solver rounds (stops early when the error rises)")

    @model_validator(mode="after")
    def _check_int_asym(self):
        if self.fmt != "int" or self.symmetric:
            raise ValueError("hqq needs fmt=int without symmetric (it optimises the zero "
                             "point); drop fmt/symmetric")
        return self


@register_method("hqq")
class HQQ(RTN):
    """HQQ: int asym with zero points from a half-quadratic lp solver, no calibration."""

    Config = HQQConfig

    @torch.no_grad()
    def prepare(self, model, ctx):
        cfg = self.config
        fmt = cfg.qformat().format()
        spec = cfg.qformat()

        def build(name, linear):
            w = linear.weight.detach()
            res = hqq_quantize(w, fmt, lp_norm=cfg.lp_norm, beta=cfg.beta, kappa=cfg.kappa,
                               iters=cfg.iters)
            layer, module = split_layer_name(name)
            rtn = fmt.fake_quantize(w.float(), scale_dtype=torch.float16)
            for stat, q in (("rtn_weight_mse", rtn), ("hqq_weight_mse", res.weight),
                            ("hqq_frac_zero_weight_mse", res.weight_frac)):
                ctx.recorder.layer_stat(layer, module, stat, float((w.float() - q).pow(2).mean()))
            packed = pack_qparams(res.qparams, fmt)
            m = PackedLinear(linear.in_features, linear.out_features, spec,
                             linear.bias is not None, tensors=packed.tensors())
            if linear.bias is not None:
                m.bias.data.copy_(linear.bias.detach())
            return m.to(w.device)

        names = decoder_linear_names(model)
        for name in tqdm(names, desc="hqq", unit="layer", leave=False):
            replace_linears(model, [name], build)
        return model
