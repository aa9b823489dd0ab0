"""BitNet b1.58 (Ma et al. 2024) as quantization-aware training of a pretrained model.

QAT (``methods/qat.py``: its loss, data and training settings) on the ``ternary`` format:
absmean scale, RoundClip(W / s, -1, 1), BitNet's straight-through estimator. Two additions:

- Phase-in: the forward sees ``W + lambda (Q(W) - W).detach()``, lambda rising linearly from 0
  to 1 over ``warmup_quant_steps`` optimizer steps (Hugging Face, "Fine-tuning LLMs to 1.58bit",
  2024: quantizing a pretrained model at once destroys most of what it knew; a gradual lambda
  kept it). Lambda is a function of the step number alone (``Objective.on_step``), so a
  resumed run sees the lambda it would have seen.
- ``act_bits``: BitNet's absmax per-token quantization of each linear's input (8 in the paper),
  phased in by the same lambda, straight-through.

``finalize`` packs the ternary weights (lambda = 1) as every ternary model is stored.

Scale granularity: BitNet uses one absmean scale per tensor; the ``ternary`` format has one per
row (``group_size=-1``) or per group. Per row is the closest, and finer. Per tensor would need
a tensor-wide grouping in the format (``harness.quant.primitives.grouped`` and the planner's
``resolve_group_size`` accept only -1 or a divisor), or, equivalently since every row has the
same length, the per-row format with each row's scale set to the mean of the row absmeans
(same storage, one fake-quantization path of its own). Without ``--group-size`` the planner
resolves the group size as for every method (128 where it divides); pass ``--group-size -1``
for per row.

The activation quantization is a forward pre-hook on each layer, so it stays on the packed
layers the run evaluates; the packed file does not record it, so a later ``harness eval`` of
that file measures the weights alone (W1.58A16).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from pydantic import Field, model_validator

from harness.errors import HarnessError
from harness.quant.grid import round_half_away
from harness.quant.linear import QuantLinear
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.registry import register_method
from methods.qat import QAT, QATConfig, make_objective
from methods.weightquant import pack_all


class BitNetConfig(QATConfig):
    fmt: str = Field("ternary", description="ternary only (BitNet b1.58's weights)")
    # BitNet has no clipping initialisation, and with the phase-in the first steps train the
    # full-precision model, which a clamp of its weights would change.
    clip: bool = False
    # None = half of train.steps: the Hugging Face 1.58-bit fine-tuning study's linear
    # schedule, lambda = min(2 step / total, 1), among its best; the second half trains the
    # fully quantized model that is stored.
    warmup_quant_steps: int | None = Field(
        None, ge=0, description="steps over which lambda rises from 0 to 1; 0: quantized from "
        "the start; unset: half of train.steps")
    act_bits: int | None = Field(None, ge=2, le=8, description="absmax per-token activation "
                                 "bits of the linears' inputs (BitNet: 8); unset: off")

    @model_validator(mode="before")
    @classmethod
    def _ternary_only(cls, values):
        if isinstance(values, dict):
            if values.get("fmt", "ternary") != "ternary":
                raise HarnessError(f"bitnet quantizes to fmt=ternary, got fmt={values['fmt']}; "
                                   f"drop fmt (or use --methods qat for other formats)")
            values = dict(values, fmt="ternary")
        return values

    @model_validator(mode="after")
    def _warmup_within_budget(self):
        if self.clip:
            raise HarnessError("bitnet has no clipping initialisation; drop clip=true")
        if self.warmup_quant_steps is not None and self.warmup_quant_steps > self.train.steps:
            raise HarnessError(f"warmup_quant_steps={self.warmup_quant_steps} exceeds "
                               f"train.steps={self.train.steps}, so training would never see the "
                               f"stored ternary weights; set warmup_quant_steps <= train.steps")
        return self


def warmup_steps(config: BitNetConfig) -> int:
    """The phase-in length a config asks for (None: half the training budget)."""
    if config.warmup_quant_steps is not None:
        return config.warmup_quant_steps
    return config.train.steps // 2


def quant_lambda(step: int, warmup: int) -> float:
    """Lambda before optimizer step ``step`` (0-based): ``step / warmup`` clamped to 1."""
    if warmup <= 0:
        return 1.0
    return min(1.0, step / warmup)


def phase_in(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """``x + lam (q - x).detach()``; ``q`` itself at lam = 1 and ``x`` at 0, exactly (the
    general form rounds). ``q`` carries its own straight-through gradient."""
    if lam <= 0:
        return x
    if lam >= 1:
        return q
    return x + lam * (q.to(x.dtype) - x).detach()


def absmax_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """BitNet's activation quantization: per token (last dim) ``s = (2^(b-1) - 1) / max|x|``,
    ``round(x s)`` clamped to [-2^(b-1), 2^(b-1) - 1], divided by ``s``. Straight-through: the
    gradient reaches ``x`` unchanged."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    with torch.no_grad():
        scale = qmax / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        q = (round_half_away(xf * scale).clamp(-qmax - 1, qmax) / scale).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        q = q + (x - x.detach())  # exactly 0 forward
    return q


@dataclass
class PhaseIn:
    """Lambda shared by every layer of a model and their activation hooks."""

    value: float = 1.0


class PhasedQuantLinear(QuantLinear):
    """Training form whose weight is phased in: ``W + lambda (Q(W) - W).detach()``."""

    phase: PhaseIn

    def dequantized_weight(self) -> torch.Tensor:
        lam = self.phase.value
        if lam <= 0 and self.batched_weight is None:
            return self.weight  # no fake quantization computed for nothing
        return phase_in(self.weight, super().dequantized_weight(), lam)


def activation_hook(bits: int, phase: PhaseIn):
    """A forward pre-hook quantizing a linear's input, phased in by ``phase``."""

    def hook(_module, args):
        x = args[0]
        if phase.value <= 0:
            return None
        return (phase_in(x, absmax_per_token(x, bits), phase.value), *args[1:])

    return hook


def to_phased_linears(model, config: BitNetConfig, phase: PhaseIn):
    """Every decoder linear becomes a :class:`PhasedQuantLinear` reading ``phase`` (in place),
    with the activation hook when ``config.act_bits`` is set."""
    qformat = config.qformat()

    def make(_name, linear):
        m = PhasedQuantLinear.from_linear(linear, qformat, detach_scales=config.detach_scales)
        m.phase = phase
        if config.act_bits is not None:
            m.register_forward_pre_hook(activation_hook(config.act_bits, phase))
        return m

    return replace_linears(model, decoder_linear_names(model), make)


@register_method("bitnet")
class BitNet(QAT):
    """BitNet b1.58: ternary QAT with lambda phase-in, optional 8-bit activations."""

    citation = ("Ma et al. 2024, The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits, "
                "arXiv 2402.17764")

    Config = BitNetConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.phase = PhaseIn(1.0)

    def prepare(self, model, ctx):
        self.init_weights(model, ctx)  # the pretrained weights unless init= names a start
        return to_phased_linears(model, self.config, self.phase)

    def objective(self, ctx):
        warmup = warmup_steps(self.config)
        self.phase.value = quant_lambda(0, warmup)

        def on_step(step: int) -> None:
            self.phase.value = quant_lambda(step, warmup)

        return replace(make_objective(self.config, ctx), on_step=on_step)

    def finalize(self, model, ctx):
        self.phase.value = 1.0  # stored (and evaluated) as fully ternary
        return pack_all(model)

