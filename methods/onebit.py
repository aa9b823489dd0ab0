"""OneBit: 1-bit sign matrices with fp16 value vectors, SVID init, logit + hidden distillation.

Each decoder linear becomes Y = LayerNorm(((X * g) @ sign(W)^T) * h) + bias with g, h from a
rank-1 non-negative factorisation of |W| (SVID). Training distils the FP model's logits
(KL(T||S)) and its L2-normalised hidden states; embeddings and lm_head stay frozen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.api import Method, MethodConfig, Needs, Objective, TeacherSampling
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.quant.onebit import OneBitLinear, rank1_svd_error, svid_error
from harness.registry import register_method
from harness.train.config import TrainConfig
from harness.train.losses import onebit_loss
from methods.clip import split_layer_name
from methods.weightquant import pack_all


class OneBitConfig(MethodConfig):
    fmt: Literal["binary"] = Field("binary", description="sign bits + fp16 value vectors g, h")
    weight_bits: Literal[1] = 1
    init: Literal["nmf", "svd"] = Field("nmf", description="SVID factorisation of |W|")
    alpha: float = Field(1.0, ge=0, description="weight of the hidden-state loss")
    weighting: Literal["paper", "code"] = Field(
        "paper", description="paper: KD + alpha*hidden; code: 0.01*KD + alpha*hidden")
    data: Literal["corpus", "teacher"] = "teacher"
    # lr 1e-3, not the paper's 4e-4 (its smallest model is 1.3B): on SmolLM2-135M (CPU, quick
    # profile) 1e-3 gave 13.6x lower PPL than 4e-4 after 40 steps, 1.3x after 160 and the same
    # after 300; 2e-3 spiked and ended worse (docs/RESULTS.md, "OneBit learning rate").
    # Warm-up 4 steps, not the reference's 500 (scripts/llama2_7b.sh), which are ~1% of its
    # ~51k steps: over the quick profile's 40 the lr would climb to 8% of its peak and never
    # get there (docs/IMPLEMENTATION.md, "Deviations from the reference code").
    train: TrainConfig = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=4,
                                     betas=(0.9, 0.98), weight_decay=0.01)

    @property
    def kd_scale(self) -> float:
        return 1.0 if self.weighting == "paper" else 0.01


@register_method("onebit")
class OneBit(Method):
    """1-bit weights (sign) + value vectors, SVID init, KD on logits and hidden states."""

    citation = ("Xu et al. 2024, OneBit: Towards Extremely Low-bit Large Language Models, "
                "arXiv 2402.11295")

    Config = OneBitConfig

    def needs(self):
        teacher_data = (TeacherSampling.from_train(self.config.train)
                        if self.config.data == "teacher" else None)
        return Needs(teacher_data=teacher_data, teacher_model=True)

    def prepare(self, model, ctx):
        def convert(name, linear):
            module = OneBitLinear.from_linear(linear, init=self.config.init)
            layer, short = split_layer_name(name)
            w = linear.weight.data
            ctx.recorder.layer_stat(layer, short, "svid_error",
                                    float(svid_error(w, module.h.data, module.g.data)))
            ctx.recorder.layer_stat(layer, short, "svd_rank1_error", float(rank1_svd_error(w)))
            return module

        return replace_linears(model, decoder_linear_names(model), convert)

    def objective(self, ctx):
        cfg = self.config

        def loss(inputs):
            return onebit_loss(inputs.student_logits, inputs.teacher_logits, inputs.labels,
                               inputs.student_hidden, inputs.teacher_hidden, alpha=cfg.alpha,
                               kd_scale=cfg.kd_scale)

        return Objective(loss=loss, needs_teacher=True, needs_hidden_states=True, data=cfg.data)

    def finalize(self, model, ctx):
        return pack_all(model)
