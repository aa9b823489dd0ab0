"""The contract between the harness and methods: what a method is given, returns and declares.

The harness owns everything around a method (loading, data, teacher, training loop, evaluation,
storage, scheduling) and never imports ``methods/``; methods, built-in or from a plugin, import
this module. A method has a typed config and three lifecycle steps, in the spirit of torchao's
prepare/convert and llm-compressor's modifiers:

- ``prepare(model, ctx)``: swap ``nn.Linear`` for training-form quantized modules and
  initialise them (RTN, clipping search, SVID...).
- ``objective(ctx)``: ``None`` for post-training methods, else an :class:`Objective` the shared
  trainer minimises.
- ``finalize(model, ctx)``: convert to the packed storage form that is evaluated and saved.

and one declaration, ``needs()`` (:class:`Needs`): what a run of it reads besides the model, so
that schedulers can prepare it (teacher data generated once, before the runs that read it)
without knowing the method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from harness.train.config import TrainConfig

log = logging.getLogger(__name__)


class MethodConfig(BaseModel):
    """Base of every method's config: typed, validated, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ObjectiveInputs:
    """What the trainer hands a loss: student outputs, optional teacher outputs, the batch."""

    student_logits: torch.Tensor
    labels: torch.Tensor  # next-token targets aligned with logits, -100 where ignored
    teacher_logits: torch.Tensor | None = None
    student_hidden: tuple[torch.Tensor, ...] | None = None
    teacher_hidden: tuple[torch.Tensor, ...] | None = None


@dataclass
class Objective:
    """A training objective: the loss and what it needs from the harness.

    Attributes:
        loss: maps :class:`ObjectiveInputs` to a scalar loss.
        needs_teacher: run the frozen full-precision teacher on each batch.
        needs_hidden_states: ask both models for hidden states (OneBit).
        data: ``"corpus"`` (training plays) or ``"teacher"`` (teacher-generated continuations).
        metrics: values computed before training (e.g. CAKLD's gamma), stored with the run.
        on_step: called by the trainer with the 0-based optimizer step before that step's
            forward (BitNet's quantization phase-in). What it sets must be a function of the
            step alone: a resumed run calls it from the checkpoint's step on, never before.
    """

    loss: Callable[[ObjectiveInputs], torch.Tensor]
    needs_teacher: bool = False
    needs_hidden_states: bool = False
    data: Literal["corpus", "teacher"] = "corpus"
    metrics: dict[str, float] = field(default_factory=dict)
    on_step: Callable[[int], None] | None = None


class Recorder:
    """Where a run's results go. The driver's recorder writes to the store; a Ray worker's
    buffers them and the driver writes them (workers never write to SQLite)."""

    def metric(self, name: str, value: float, task: str | None = None, **extra: Any) -> None:
        raise NotImplementedError

    def train_step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        raise NotImplementedError

    def layer_stat(self, layer: str, module: str, stat: str, value: float) -> None:
        raise NotImplementedError

    def artifact(self, kind: str, path: str) -> None:
        raise NotImplementedError

    def series(self, name: str, values, task: str | None = None) -> None:
        """One value per evaluated item (a perplexity window's NLL, an example's correctness):
        what confidence intervals and paired comparisons between runs are computed from."""
        raise NotImplementedError


class NullRecorder(Recorder):
    """Records nothing (library use without a store)."""

    def metric(self, name, value, task=None, **extra):
        pass

    def train_step(self, step, loss, lr, tokens_per_s):
        pass

    def layer_stat(self, layer, module, stat, value):
        pass

    def artifact(self, kind, path):
        pass

    def series(self, name, values, task=None):
        pass


@dataclass
class RunContext:
    """What a method may use. Expensive members are loaded on first access by the runner.

    Attributes:
        spec: the validated run spec (``harness.config.RunSpec``).
        device: torch device the run uses.
        tokenizer: the model's tokenizer.
        recorder: metrics / train steps / layer stats sink.
        run_dir: per-run directory (checkpoints, exports).
        calibration: callable returning calibration token batches ``[n, seq]`` (clipping),
            sized as the method's ``needs().calibration`` says.
        teacher: callable returning the frozen full-precision teacher (loaded once).
        train_batches: callable returning training token batches for a data source.
    """

    spec: Any
    device: torch.device
    tokenizer: Any
    recorder: Recorder
    run_dir: Path
    calibration: Callable[[], torch.Tensor] | None = None
    teacher: Callable[[], nn.Module] | None = None
    train_batches: Callable[[str], torch.Tensor] | None = None
    release_teacher: Callable[[], None] | None = None  # frees ``teacher()``'s copy (if loaded)


@dataclass(frozen=True)
class TeacherSampling:
    """How the teacher-generated training data a run reads is sampled: the arguments of
    :func:`harness.train.teacher_data.teacher_sequences`, which keys its cache on them."""

    samples: int
    new_tokens: int
    temperature: float
    top_k: int
    top_p: float

    @classmethod
    def from_train(cls, train: TrainConfig) -> TeacherSampling:
        """The sampling a method's training settings (``config.train``) ask for."""
        return cls(samples=train.teacher_samples, new_tokens=train.teacher_new_tokens,
                   temperature=train.temperature, top_k=train.teacher_top_k,
                   top_p=train.teacher_top_p)


@dataclass(frozen=True)
class Calibration:
    """The calibration blocks ``ctx.calibration()`` returns: ``samples`` x ``seq_len`` tokens.
    The defaults are what a method that declares none gets."""

    samples: int = 16
    seq_len: int = 512


@dataclass(frozen=True)
class Needs:
    """What a run of a method reads besides the model, declared before it starts.

    Attributes:
        teacher_data: the teacher-generated continuations its training (or its setup, such as
            CAKLD's gamma) reads, with their sampling; ``None`` when it reads none. The Ray
            scheduler generates each distinct set once, before the runs that read it.
        calibration: the calibration blocks ``prepare`` reads (``None``: none).
        teacher_model: whether it runs the frozen full-precision teacher (distillation).
    """

    teacher_data: TeacherSampling | None = None
    calibration: Calibration | None = None
    teacher_model: bool = False


class Method:
    """Base class. Subclasses set ``Config``, ``description``, override the lifecycle and
    declare in :meth:`needs` what their runs read."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the paper (authors, year, arXiv id or address) whose algorithm this is; ``harness
    #: methods`` prints a class's own (a subclass does not inherit its parent's paper). Empty
    #: for the harness's own ablation rungs.
    citation: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: False for the full-precision reference, which has no bits/group.
    quantizes: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def needs(self) -> Needs:
        """What a run with ``self.config`` reads besides the model. Nothing by default: a
        method that reads teacher data without declaring it still gets it, generated inside
        its own run instead of once per sweep."""
        return Needs()

    def check_shapes(self, in_features: set[int]) -> None:
        """Refuses (``HarnessError``, one line with the fix) a config that the model's
        quantized layers make impossible; ``in_features``: their input sizes. The planner
        calls it before any run exists, so a refusal leaves no run row. Nothing by default."""

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def objective(self, ctx: RunContext) -> Objective | None:
        return None

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    @classmethod
    def summary(cls) -> str:
        return cls.description or (cls.__doc__ or "").strip().splitlines()[0]
