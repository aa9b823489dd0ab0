"""Quantization formats: the validated, serialisable spec (``QuantFormat``), the format
objects that own the math (``Format`` and its registered subclasses), and group-size resolution.

A ``QuantFormat`` is what run specs and packed files store; ``QuantFormat.format()`` gives the
object that quantizes, dequantizes, fake-quantizes, packs codes and says which fused kernel
serves it. Formats live in the registry ``FORMATS``; a new one is one file with a
``@register_format("name")`` class (``harness/quant/ternary.py`` is the example).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.errors import HarnessError
from harness.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from harness.quant.grid import valid_group_sizes
from harness.quant.packed import PackedTensor, stored_nbytes
from harness.quant.primitives import (
    QParams,
    check_grid,
    dequantize_grid,
    fake_quantize_grid,
    quantize_grid,
)
from harness.registry import Registry


class QuantFormat(BaseModel):
    """A weight format spec: integer (asym/sym, 1-8 bits), NF3 asymmetric, binary (OneBit) or
    any other registered format (ternary). Validation is the format class's own ``check``.

    Its serialised form is part of run keys and packed files: parameters a format adds (like
    ternary's ``scaling``) are left out of the dump while unset, so older specs dump as before.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fmt: str = "int"
    bits: int
    group_size: int = 128
    symmetric: bool = False
    scaling: Literal["absmean", "absmax"] | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, values):
        # A fixed-width format (ternary) needs no bits from the user, and the spec names its
        # parameters' defaults, so a stored spec says e.g. which scaling produced the codes.
        fmt_cls = None
        if isinstance(values, dict) and isinstance(values.get("fmt"), str):
            fmt_cls = format_class(values["fmt"], quiet=True)
        if fmt_cls is None:
            return values
        values = {**fmt_cls.param_defaults(), **values}
        if "bits" not in values and fmt_cls.fixed_bits is not None:
            values["bits"] = fmt_cls.fixed_bits
        return values

    @model_validator(mode="after")
    def _valid(self):
        try:  # the format class's own rules, one source for the spec and the quantizers
            fmt_cls = format_class(self.fmt)
            fmt_cls.check(self.bits, self.symmetric, self.params())
        except HarnessError as exc:
            raise ValueError(str(exc)) from None
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size}: use -1 (per row) or a positive size")
        return self

    def params(self) -> dict[str, Any]:
        """Format-specific parameters that are set (ternary: ``scaling``)."""
        return {k: v for k, v in (("scaling", self.scaling),) if v is not None}

    def divisible(self, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0

    def format(self) -> Format:
        """The format object that does the math for this spec."""
        return format_class(self.fmt).build(self.bits, self.group_size, self.symmetric,
                                             **self.params())


def resolve_group_size(in_features: Iterable[int], requested: int | str | None) -> int:
    """The group size a run uses.

    ``None``/``"auto"``: 128 if it divides every quantized layer's input, else the largest of
    64 and 32 that does, else -1 (per row). An explicit size must divide every input.

    Raises:
        HarnessError: an explicit size that does not divide, listing the sizes that do.
    """
    dims = sorted(set(in_features))
    if requested in (None, "auto"):
        for g in (128, 64, 32):
            if all(d % g == 0 for d in dims):
                return g
        return -1
    g = int(requested)
    if g == -1 or (g > 0 and all(d % g == 0 for d in dims)):
        return g
    raise HarnessError(f"group size {g} does not divide the quantized layers' input dims "
                       f"{dims}; use one of {valid_group_sizes(dims)}")


# --- format objects -----------------------------------------------------------------------

#: Formats from other packages come in through the entry-point group ``harness.formats``
#: (``seq = "pkg.formats:SEQFormat"``), scanned on first lookup like ``harness.methods``; a
#: name declared twice, or one of the harness's own (int, nf3, binary, ternary), is refused.
FORMATS: Registry = Registry("format", entry_point_group="harness.formats")


def register_format(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_format("mine") class Mine(Format): ...``.

    Raises:
        HarnessError: ``name`` is already taken by another class or entry point.
    """

    def wrap(cls: type) -> type:
        # replaces a lazy "module:attr" entry (built-in or entry point) that points here;
        # another class is refused, so no plugin shadows a built-in by importing first
        current = FORMATS._items.get(name)
        here = f"{cls.__module__}:{cls.__qualname__}"
        there = current if isinstance(current, str) else (
            f"{getattr(current, '__module__', '?')}:{getattr(current, '__qualname__', '?')}")
        if current is not None and current is not cls and there not in (
                here, here.partition(":")[0]):
            raise FORMATS._duplicate(name, FORMATS._source(name), here)
        FORMATS._items[name] = cls
        cls.name = name
        return cls

    return wrap


def format_class(name: str, quiet: bool = False) -> type[Format] | None:
    if quiet and name not in FORMATS:
        return None
    cls = FORMATS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Format)):
        raise HarnessError(f"format {name!r} is registered but is not a Format class; decorate "
                           f"it with @register_format({name!r})")
    return cls


def get_format(fmt: str | QuantFormat | Format, bits: int | None = None, group_size: int = 128,
               symmetric: bool = False, **params) -> Format:
    """The format object for a spec, a format object (returned as is) or loose fields
    (``get_format("int", 3, 64)``); the loose form is what the old ``fmt, bits, ...``
    signatures dispatch through.

    Raises:
        HarnessError: unknown format or parameters it refuses (one line with the fix).
    """
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, QuantFormat):
        return fmt.format()
    cls = format_class(fmt)
    if bits is None:
        bits = cls.fixed_bits if cls.fixed_bits is not None else 3
    return cls.build(bits, group_size, symmetric, **params)


@dataclass(frozen=True, kw_only=True)
class Format:
    """A weight format: grid, parameters, codes and their packing.

    Weights are ``[out, in]`` and grouped along the input dimension (``group_size=-1``: one
    group per row). Subclasses implement ``check``, ``quantize``, ``dequantize`` and
    ``fake_quantize``; codes are packed at ``bits`` per code unless ``pack_codes`` says
    otherwise. Instances are immutable and hashable, so layers can share and batch on them.

    Attributes:
        name: registry name (set by :func:`register_format`), stored as ``fmt`` in specs.
        kernel: module of the fused CUDA kernel serving this format (``None``: plain torch ops
            on every device). ``fake_quantize`` picks it itself; batching code asks here.
        fixed_bits: the ``bits`` a fixed-width format always stores in its spec (else None).
        nominal_bits: bits per weight of the codes alone, for messages (ternary: 1.58).
    """

    name: ClassVar[str] = "?"
    kernel: ClassVar[str | None] = None
    fixed_bits: ClassVar[int | None] = None

    bits: int
    group_size: int = 128
    symmetric: bool = False

    @classmethod
    def check(cls, bits: int, symmetric: bool, params: dict[str, Any]) -> None:
        """Raises ``HarnessError`` for parameters this format cannot take."""
        if params:
            raise HarnessError(f"{', '.join(params)} does not apply to fmt={cls.name}; drop it")

    @classmethod
    def build(cls, bits: int, group_size: int = 128, symmetric: bool = False,
              **params) -> Format:
        cls.check(bits, symmetric, params)
        return cls(bits=bits, group_size=group_size, symmetric=symmetric, **params)

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Defaults of the format-specific parameters (fields beyond bits/group/symmetric)."""
        base = {"bits", "group_size", "symmetric"}
        return {f.name: f.default for f in fields(cls) if f.name not in base}

    @property
    def nominal_bits(self) -> float:
        return float(self.bits)

    def params(self) -> dict[str, Any]:
        base = {"bits", "group_size", "symmetric"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in base}

    def spec(self) -> QuantFormat:
        """The serialisable spec (what run specs and packed files store)."""
        return QuantFormat(fmt=self.name, bits=self.bits, group_size=self.group_size,
                           symmetric=self.symmetric, **self.params())

    def label(self) -> str:
        return (f"{self.name}{self.bits} g{self.group_size}"
                f"{' sym' if self.symmetric else ''}")

    # --- the math (pure: tensors in, tensors out) ------------------------------------------
    def quantize(self, w: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> QParams:
        """Codes + parameters with ``dequantize(quantize(w)) == fake_quantize(w,
        scale_dtype=scale_dtype)`` exactly."""
        raise NotImplementedError

    def dequantize(self, q: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def fake_quantize(self, w: torch.Tensor, *, detach_scales: bool = False,
                      scale_dtype: torch.dtype | None = None, fused: bool = True,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Quantize-dequantize with a straight-through gradient (see
        :func:`fake_quantize` for the arguments)."""
        raise NotImplementedError

    # --- storage ---------------------------------------------------------------------------
    def codes_nbytes(self, numel: int) -> int:
        return packed_nbytes(numel, self.bits)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Unsigned codes -> the stored 1-D uint8 tensor."""
        return pack_bits(codes, self.bits)

    def unpack_codes(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        """Inverse of :meth:`pack_codes`: the first ``numel`` codes, 1-D uint8."""
        return unpack_bits(packed, self.bits, numel)

    def pack_zeros(self, zeros: torch.Tensor | None) -> torch.Tensor | None:
        return zeros

    def unpack_zeros(self, zeros: torch.Tensor | None, scales: torch.Tensor):
        return zeros

    def empty_zeros(self, out_f: int, n_groups: int) -> torch.Tensor | None:
        """The stored zero-point tensor's shape, zero-filled (``None``: the format has none)."""
        return None

    def n_groups(self, in_f: int) -> int:
        return 1 if self.group_size == -1 else in_f // self.group_size

    def empty_tensors(self, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        """Zero-filled stored tensors of the right shapes, for ``load_state_dict``."""
        ng = self.n_groups(in_f)
        out = {"codes": torch.zeros(self.codes_nbytes(out_f * in_f), dtype=torch.uint8),
               "scales": torch.zeros(out_f, ng, dtype=torch.float16)}
        zeros = self.empty_zeros(out_f, ng)
        if zeros is not None:
            out["zeros"] = zeros
        return out

    def pack(self, w: torch.Tensor) -> PackedTensor:
        """Quantizes ``w`` (fp16 scales) and packs it; ``pack(w).dequantize()`` equals
        ``fake_quantize(w, scale_dtype=torch.float16)`` bit for bit."""
        q = self.quantize(w.detach(), scale_dtype=torch.float16)
        return PackedTensor(self.pack_codes(q.codes), q.scales, self.pack_zeros(q.zeros),
                            self.name, self.bits, self.group_size, self.symmetric,
                            tuple(w.shape), format=self)

    def unpack(self, p: PackedTensor) -> QParams:
        codes = self.unpack_codes(p.codes, p.shape[0] * p.shape[1]).view(p.shape)
        return QParams(codes, p.scales, self.unpack_zeros(p.zeros, p.scales), self.name,
                       self.bits, self.group_size, self.symmetric, p.shape)

    stored_nbytes = staticmethod(stored_nbytes)


@dataclass(frozen=True, kw_only=True)
class _GridFormat(Format):
    """INT and NF3 share their math in ``harness.quant.primitives`` (the reference graph, the
    CPU autograd Functions of ``fused`` and the Triton kernel of ``triton_fq``), keyed by
    ``name``: delegating keeps every path bit-identical to what it was before formats were
    objects."""

    kernel: ClassVar[str | None] = "harness.quant.triton_fq"

    @classmethod
    def check(cls, bits, symmetric, params):
        check_grid(cls.name, bits, symmetric)
        super().check(bits, symmetric, params)

    def quantize(self, w, scale_dtype=torch.float16):
        return quantize_grid(w, self.name, self.bits, self.group_size, self.symmetric,
                              scale_dtype)

    def dequantize(self, q, dtype=torch.float32):
        return dequantize_grid(q, dtype)

    def fake_quantize(self, w, *, detach_scales=False, scale_dtype=None, fused=True,
                      out_dtype=None):
        return fake_quantize_grid(w, self.name, self.bits, self.group_size, self.symmetric,
                                   detach_scales, scale_dtype, fused, out_dtype)


@register_format("int")
@dataclass(frozen=True, kw_only=True)
class IntFormat(_GridFormat):
    """Integer grid, 1-8 bits: asymmetric (scale + integer zero point per group, the zero
    point stored at the code width) or symmetric (scale only; codes offset by 2^(bits-1))."""

    def pack_zeros(self, zeros):
        # zero points are codes too: stored at the code width
        return None if zeros is None else self.pack_codes(zeros)

    def unpack_zeros(self, zeros, scales):
        if zeros is None:
            return None
        return self.unpack_codes(zeros, scales.numel()).view(scales.shape)

    def empty_zeros(self, out_f, n_groups):
        if self.symmetric:
            return None
        return torch.zeros(self.codes_nbytes(out_f * n_groups), dtype=torch.uint8)


@register_format("nf3")
@dataclass(frozen=True, kw_only=True)
class NF3Format(_GridFormat):
    """BitDistiller's asymmetric NF3: eight levels, the positive side scaled by the group's
    max and the negative side by |min|, both kept as fp16 (``scales`` and ``zeros``). Always
    spelt with ``bits=3`` (run specs stored it so), hence no ``fixed_bits`` fill-in."""

    @classmethod
    def check(cls, bits, symmetric, params):
        super().check(bits, symmetric, params)
        if symmetric:
            raise HarnessError("nf3 is asymmetric by construction (max and |min| scale each "
                               "side); drop symmetric or use fmt=int")

    def empty_zeros(self, out_f, n_groups):
        return torch.zeros(out_f, n_groups, dtype=torch.float16)


# Formats outside this module register on first lookup, so importing the core stays cheap.
FORMATS.register("binary", "harness.quant.onebit:BinaryFormat")
FORMATS.register("ternary", "harness.quant.ternary:TernaryFormat")
FORMATS.register("intfz", "harness.quant.intfz:IntFZFormat")


# --- the format-generic entry points: a format object, a spec, or the loose fields --------

def fake_quantize(w: torch.Tensor, fmt: str | Format | QuantFormat = "int", bits: int | None = None,
                  group_size: int = 128, symmetric: bool = False, *, detach_scales: bool = False,
                  scale_dtype: torch.dtype | None = None, fused: bool = True,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` with straight-through rounding.

    Args:
        w: ``[out, in]`` weight.
        fmt: a format object (``harness.quant.formats.Format``), a ``QuantFormat`` spec, or a
            registered name (``"int"``, ``"nf3"``, ``"ternary"``...) with the loose fields
            below; an object or spec ignores ``bits``, ``group_size`` and ``symmetric``.
        bits: 1-8 for int, 3 for nf3; ``None``: the format's fixed width, else 3.
        group_size: group along the input dimension; -1 = whole row.
        symmetric: symmetric integer grid.
        detach_scales: stop gradients into scales (min/max); by default they flow, as in the
            reference code.
        scale_dtype: round scales to this dtype first (fp16 = what packed storage holds).
        fused: on CUDA with Triton, one fused kernel per pass for every format
            (``harness.quant.triton_fq``); elsewhere one autograd Function per format with an
            analytic backward (``harness.quant.fused``). ``False`` records the reference graph
            op by op.
        out_dtype: dtype of the result (default ``w``'s); the fused CUDA kernel writes it
            directly, sparing a cast pass under autocast.

    Returns:
        Tensor of ``w``'s shape, in ``out_dtype`` or ``w``'s dtype.

    Raises:
        HarnessError: bad format/bits or a group size that does not divide the input dim.
    """
    return get_format(fmt, bits, group_size, symmetric).fake_quantize(
        w, detach_scales=detach_scales, scale_dtype=scale_dtype, fused=fused, out_dtype=out_dtype)


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str | Format | QuantFormat = "int", bits: int | None = None,
             group_size: int = 128, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float16) -> QParams:
    """Codes + parameters such that ``dequantize(quantize(w)) == fake_quantize(w,
    scale_dtype=scale_dtype)`` exactly; ``fmt`` as for :func:`fake_quantize`."""
    return get_format(fmt, bits, group_size, symmetric).quantize(w, scale_dtype=scale_dtype)


def dequantize(q: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights from codes; computed in float32 exactly as :func:`fake_quantize` does."""
    fmt = get_format(q.fmt, q.bits, q.group_size, q.symmetric, **q.params)
    return fmt.dequantize(q, dtype)


def pack(w: torch.Tensor, fmt: str | Format | QuantFormat = "int", bits: int | None = None,
         group_size: int = 128, symmetric: bool = False) -> PackedTensor:
    """Quantizes ``w`` and packs it; ``pack(w).dequantize()`` equals
    ``fake_quantize(w, ..., scale_dtype=torch.float16)`` bit for bit."""
    return get_format(fmt, bits, group_size, symmetric).pack(w)


def packed_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> PackedTensor:
    """A stored weight read back (``PackedTensor.tensors()`` and ``.meta()``), its format
    rebuilt from the metadata."""
    fmt = get_format(meta["fmt"], meta["bits"], meta["group_size"], meta["symmetric"])
    return PackedTensor.from_tensors(tensors, meta, fmt)
