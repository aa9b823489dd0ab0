"""BitDistiller: clipping init + self-distillation from the FP model with CAKLD.

Teacher: the frozen full-precision model. Data: its own continuations of corpus prompts
(temperature 0.7, top-k 50). Loss: CAKLD = gamma*KL(S||T) + (1-gamma)*KL(T||S), gamma estimated
once before training ("paper": mean teacher probability of the data tokens; "code": the reference
repository's computation). Defaults follow the paper: 3-bit NF3 asym, 2-bit INT asym; training
follows the reference code (``methods.qat.REFERENCE_TRAIN``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from harness.models import no_cache
from harness.registry import register_method
from harness.train.losses import gamma_code, gamma_paper
from methods.qat import QAT, QATConfig, make_objective

GAMMA_BATCHES = 11  # the reference code averages its estimate over 11 batches


class BitDistillerConfig(QATConfig):
    loss: str = "cakld"
    gamma: Literal["paper", "code"] | Annotated[float, Field(ge=0, le=1)] = Field(
        "paper", description="CAKLD mixing: paper, code, or a fixed value in [0, 1]")


@torch.no_grad()
def estimate_gamma(variant: str, ctx, batch_size: int, data_kind: str = "teacher") -> float:
    """gamma from the teacher's probabilities on the run's own training data (``data_kind``;
    its training part: the held-out slice is not seen, as in the reference, which estimates on
    its train split), over its first ``GAMMA_BATCHES`` batches: the reference code's sample,
    for both variants."""
    data = ctx.train_batches(data_kind)
    teacher = ctx.teacher()
    n = min(GAMMA_BATCHES, max(1, data.size(0) // batch_size))

    def batches():  # one batch's fp32 logits alive at a time (a 7B batch of 8 x 1024: 1 GB)
        for i in range(n):
            ids = data[i * batch_size : (i + 1) * batch_size].to(ctx.device)
            yield teacher(ids, **no_cache(teacher)).logits[:, :-1].float(), ids[:, 1:]

    if variant == "paper":
        return float(sum(gamma_paper(lg, lb) for lg, lb in batches()) / n)
    return float(gamma_code(lg for lg, _ in batches()))


@register_method("bitdistiller")
class BitDistiller(QAT):
    """Clipping init + self-distillation (CAKLD) on teacher-generated data."""

    citation = ("Du et al. 2024, BitDistiller: Unleashing the Potential of Sub-4-Bit LLMs via Self-"
                "Distillation, arXiv 2402.10631")

    Config = BitDistillerConfig

    def objective(self, ctx):
        gamma = None
        if self.config.loss == "cakld":
            g = self.config.gamma
            gamma = float(g) if isinstance(g, float) else estimate_gamma(
                g, ctx, self.config.train.batch_size, self.config.data)
        objective = make_objective(self.config, ctx, gamma)
        if gamma is not None:
            objective.metrics["cakld_gamma"] = gamma
        return objective
