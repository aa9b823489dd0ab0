"""``paretoq``: quantization-aware training with ParetoQ's grids and learnable scales.

Every decoder linear becomes a :class:`~harness_paretoq.linear.ParetoQLinear` (latent weight +
alpha per row, the reference's initial alpha, no clipping search) trained by the shared trainer
on QAT's objective (``loss``: ce by default, or any harness loss, e.g. ``--set loss=cakld``),
then packed: codes + fp16 alpha.

The format follows ``bits`` as the reference's ``QuantizeLinear`` does: 1 -> ``lsq`` (sign x
alpha), 2 -> ``seq``, 3 and 4 -> ``lsq``; ternary (ParetoQ's 1.58 bits) is
``--set fmt=seq_ternary``. Training defaults are the reference's ``run_train.sh``: AdamW lr
2e-5, cosine schedule, no warm-up, no weight decay, next-token CE on corpus text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from harness.errors import HarnessError
from harness.quant.formats import format_class
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.train.config import TrainConfig
from harness_paretoq.linear import ParetoQLinear
from methods.qat import QAT, QATConfig
from methods.weightquant import pack_all

#: the reference's run_train.sh: --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.
#: --lr_scheduler_type cosine (AdamW, Hugging Face Trainer's betas)
PARETOQ_TRAIN = TrainConfig(lr=2e-5, schedule="cosine", warmup_steps=0, weight_decay=0.0)

#: the format the reference's QuantizeLinear uses at each w_bits (0 = ternary: seq_ternary)
FORMAT_BY_BITS = {1: "lsq", 2: "seq", 3: "lsq", 4: "lsq"}
FORMATS = ("seq", "seq_ternary", "lsq")


class ParetoQConfig(QATConfig):
    fmt: str = Field("seq", description="unset: by bits (1: lsq sign, 2: seq, 3-4: lsq); "
                     "seq_ternary for ParetoQ's 1.58 bits")
    bits: int = Field(2, ge=1, le=8, description="weight bits: 1-4 (ternary: fmt=seq_ternary)")
    # ParetoQ starts from the reference's alpha init, with no clipping search before it
    clip: bool = False
    # the reference trains on corpus text (WikiText-2 in run_train.sh) with next-token CE
    data: Literal["corpus", "teacher"] = Field("corpus", description="corpus (the reference's "
                                               "training text) or teacher continuations")
    train: TrainConfig = PARETOQ_TRAIN

    @model_validator(mode="before")
    @classmethod
    def _format_by_bits(cls, values):
        # runs before the ladder's default (nf3 at 3 bits), which paretoq does not use
        if not isinstance(values, dict):
            return values
        bits, fmt = values.get("bits"), values.get("fmt")
        if bits is not None and (isinstance(bits, bool) or bits not in FORMAT_BY_BITS):
            raise HarnessError(f"paretoq quantizes to 1-4 bits (ParetoQ's reference has no grid "
                               f"above 4), got bits={bits}; use --bits 1-4, or --methods qat for "
                               f"wider integer grids")
        if fmt is None:
            fmt = FORMAT_BY_BITS[bits if bits is not None else 2]
        elif fmt not in FORMATS:
            raise HarnessError(f"paretoq quantizes to fmt=seq, seq_ternary or lsq, got "
                               f"fmt={fmt}; drop fmt (it follows --bits) or use --methods qat "
                               f"for fmt={fmt}")
        elif bits is not None:
            format_class(fmt).check(bits, False, {})  # the format's own one-line fix
        return dict(values, fmt=fmt)

    @model_validator(mode="after")
    def _no_clip(self):
        if self.clip:
            raise HarnessError("paretoq has no clipping initialisation (alpha starts at the "
                               "reference's max|W| or mean|W|); drop clip=true")
        return self


class ParetoQ(QAT):
    """ParetoQ: QAT with learnable per-row scales, SEQ at 1.58/2 bits, LSQ at 1/3/4 bits."""

    citation = ("Liu et al. 2025, ParetoQ: Scaling Laws in Extremely Low-bit LLM Quantization, "
                "arXiv 2502.02631")
    Config = ParetoQConfig

    def prepare(self, model, ctx):
        self.init_weights(model, ctx)  # the pretrained weights unless init= names a start
        qformat = self.config.qformat()
        detach = self.config.detach_scales
        return replace_linears(
            model, decoder_linear_names(model),
            lambda _name, linear: ParetoQLinear.from_linear(linear, qformat, detach))

    def finalize(self, model, ctx):
        return pack_all(model)
