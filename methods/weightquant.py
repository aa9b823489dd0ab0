"""Shared parts of the weight-quantization ladder (rtn -> clip -> qat -> bitdistiller).

The config fields every weight-quantizing method has, and the two conversions: latent linears to
training-form ``QuantLinear`` (prepare) and training form to packed storage (finalize).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from harness.api import Calibration, MethodConfig
from harness.errors import HarnessError
from harness.quant.formats import FORMATS, QuantFormat, format_class
from harness.quant.linear import QuantLinear
from harness.quant.modules import decoder_linear_names, quantized_modules, replace_linears


class WeightQuantConfig(MethodConfig):
    """Format of the quantized weights.

    ``group_size=None`` means "auto": 128 where it divides every quantized layer's input
    dimension, else the largest of 64/32 that does; the planner resolves it before the run.
    """

    fmt: str = Field(
        "int", description="a registered format: int, nf3, ternary...; unset: nf3 at 3 bits "
        "(BitDistiller's 3-bit format; int if symmetric), int otherwise")
    bits: int = Field(3, ge=1, le=8, description="weight bits (1-8); a fixed-width format "
                      "(ternary) sets its own")
    group_size: int | None = Field(None, description="group along inputs; -1 = per row")
    symmetric: bool = False
    # Left out of the dump while unset, so every int/nf3 run keeps its run key.
    scaling: Literal["absmean", "absmax"] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="ternary's per-group scale: absmean (BitNet b1.58, default) or absmax")
    detach_scales: bool = Field(False, description="stop gradients into scales/zeros (QAT)")

    @model_validator(mode="before")
    @classmethod
    def _ladder_format(cls, values):
        # One default format per width for every rung (rtn -> clip -> qat -> bitdistiller), so
        # that a ladder run at one width changes one thing per rung: BitDistiller's paper
        # formats, NF3 at 3 bits and INT asymmetric otherwise. An explicit fmt always wins.
        if isinstance(values, dict) and "fmt" not in values:
            bits = values.get("bits", cls.model_fields["bits"].default)
            symmetric = values.get("symmetric", cls.model_fields["symmetric"].default)
            values = dict(values, fmt="nf3" if bits == 3 and not symmetric else "int")
        if isinstance(values, dict) and isinstance(values.get("fmt"), str):
            values = _format_defaults(values)
        return values

    @field_validator("fmt")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:  # the registry's message: the known formats, the closest one
            try:
                FORMATS.get(v)
            except HarnessError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _check_format(self):
        self.qformat()  # raises a one-line error for e.g. nf3 with 2 bits
        return self

    def qformat(self):
        params = {"scaling": self.scaling} if self.scaling is not None else {}
        return QuantFormat(fmt=self.fmt, bits=self.bits,
                           group_size=self.group_size if self.group_size is not None else -1,
                           symmetric=self.symmetric, **params)



class CalibratedConfig(WeightQuantConfig):
    """The calibration blocks a post-training search reads (clip, gptq, awq), declared to the
    harness through :meth:`calibration`."""

    calib_samples: int = Field(Calibration().samples, ge=1,
                               description="calibration blocks (Julius Caesar)")
    calib_seq_len: int = Field(Calibration().seq_len, ge=8,
                               description="tokens per calibration block")

    def calibration(self) -> Calibration:
        return Calibration(samples=self.calib_samples, seq_len=self.calib_seq_len)


class IntDefaultConfig(WeightQuantConfig):
    """The post-training baselines' papers (GPTQ, HQQ) quantize to INT at every width: the
    ladder's NF3-at-3-bits default would make "gptq --bits 3" another format than the paper's.
    An explicit fmt still wins."""

    @model_validator(mode="before")
    @classmethod
    def _paper_format(cls, values):
        if isinstance(values, dict) and "fmt" not in values:
            values = dict(values, fmt="int")
        return values

def _format_defaults(values: dict) -> dict:
    """A fixed-width format's own bits and its parameters' defaults, filled in before
    validation so that the stored config names them. Bits the user set that the format
    cannot take are an error here, in one line, rather than a nested validation error."""
    fmt = values["fmt"]
    if fmt == "binary":
        raise HarnessError("fmt=binary is OneBit's layer, not a weight grid; use --methods onebit")
    if fmt not in FORMATS:
        return values  # QuantFormat's check names the unknown format and the known ones
    cls = format_class(fmt)
    if cls.fixed_bits is None:
        return values
    if "bits" in values and values["bits"] is not None:
        cls.check(values["bits"], False, {})  # raises with the format's own fix
    defaults = {f: getattr(cls, f) for f in ("scaling",) if hasattr(cls, f)}
    return {**defaults, **values, "bits": cls.fixed_bits}


def to_quant_linears(model: nn.Module, config: WeightQuantConfig) -> nn.Module:
    """Replaces every decoder linear with a training-form ``QuantLinear`` (in place)."""
    qformat = config.qformat()
    return replace_linears(
        model, decoder_linear_names(model),
        lambda _name, linear: QuantLinear.from_linear(linear, qformat,
                                                      detach_scales=config.detach_scales))


def pack_all(model: nn.Module) -> nn.Module:
    """Converts every quantized module to its packed storage form (what is evaluated/saved)."""
    for _name, module in quantized_modules(model):
        module.pack()
    return model
