"""Run specs and profiles: typed, validated, hashed.

A run is identified by the hash of its normalised spec (method config with every default
filled in, profile values resolved), so resume means "a finished run with this hash exists".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.errors import HarnessError

SCHEMA_VERSION = 1


class EvalSpec(BaseModel):
    """What to evaluate after quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(2048, gt=0, description="perplexity window (papers: 2048)")
    max_tokens: int | None = Field(None, gt=0, description="cap on held-out tokens (None = all)")
    tasks: tuple[str, ...] = Field((), description="lm-eval tasks run after perplexity")
    limit: int | None = Field(None, gt=0, description="examples per task (quick checks)")
    ppl_data: tuple[str, ...] = Field(
        ("shakespeare",), min_length=1,
        description="perplexity data sets: shakespeare, wikitext2, c4, ptb, file:PATH@SHA, "
                    "hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]; one ppl metric each")
    num_fewshot: int | None = Field(None, ge=0, description="lm-eval few-shot examples")
    allow_code_eval: bool = Field(False, description="let humaneval execute generated code")

    @model_validator(mode="after")
    def _one_window_at_least(self):
        # perplexity scores whole windows: fewer tokens than one would fail every run later
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens {self.max_tokens} (--max-eval-tokens) is less than one "
                             f"window, seq_len {self.seq_len} (--seq-len); raise it or lower "
                             f"the window")
        return self


class TrainDefaults(BaseModel):
    """Per-profile training budget, applied under a method's own training settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int = 1
    teacher_samples: int
    teacher_new_tokens: int


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    eval: EvalSpec
    train: TrainDefaults


# The offline lm-eval tasks built from the held-out plays (harness/eval/task_data.py), run after
# perplexity. Quick: the first 50 examples of each; SmolLM2 on 2 shared CPU cores spends roughly
# 45 s (cloze) + 60-90 s (next line) on them. Full: every example (<= 2,000 per task).
OFFLINE_TASKS = ("shakespeare_cloze", "shakespeare_nextline")

PROFILES: dict[str, Profile] = {
    # CPU default: SmolLM2 evaluates ~600 tokens/s on 2 cores and a 4x256 step takes 8-9 s
    # (BitDistiller) or ~8 s (OneBit), so the main job, both trained, fits `make run`'s 15
    # minutes with set-up at 20 steps (40 before 2026-12-05: 25 minutes; docs/RESULTS.md).
    # 16,384 held-out tokens = 8 windows of 2048.
    "quick": Profile(
        name="quick",
        description="CPU-sized: first 16,384 held-out tokens, short training",
        eval=EvalSpec(seq_len=2048, max_tokens=16384, tasks=OFFLINE_TASKS, limit=50),
        train=TrainDefaults(steps=20, batch_size=4, seq_len=256, teacher_samples=64,
                            teacher_new_tokens=256),
    ),
    # GPU default: the whole held-out set and a training budget of tens of GPU-minutes.
    "full": Profile(
        name="full",
        description="GPU-sized: whole held-out set, long training",
        eval=EvalSpec(seq_len=2048, max_tokens=None, tasks=OFFLINE_TASKS, limit=None),
        train=TrainDefaults(steps=1500, batch_size=8, seq_len=1024, teacher_samples=2048,
                            teacher_new_tokens=1024),
    ),
}


def default_profile() -> str:
    import torch

    return "full" if torch.cuda.is_available() else "quick"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise HarnessError(f"unknown profile {name!r}; use one of: {', '.join(PROFILES)}")
    return PROFILES[name]


def _canonical(data: dict) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


#: Evaluation settings added after runs were stored: at their defaults they are left out of
#: the hashed spec, so every earlier run keeps its key (and its results are reused).
EVAL_KEYS_SINCE_V1 = {"ppl_data": ["shakespeare"], "num_fewshot": None, "allow_code_eval": False}

#: Training settings that change when a run logs and checkpoints, never what it computes.
# grad_checkpointing recomputes activations in the backward: the same gradients, less memory
# teacher_shard: the teacher's layers gathered whole around each forward, the same outputs
WRITE_ONLY_TRAIN_KEYS = ("log_every", "checkpoint_every", "grad_checkpointing",
                         "micro_batch", "teacher_shard")
#: Training settings added after runs were stored, at their defaults: left out of the dump, so
#: every earlier run keeps its key.
TRAIN_KEYS_SINCE_V1 = {"micro_batch": None, "teacher_shard": None}


class RunSpec(BaseModel):
    """Everything that determines a run's result. Its hash is the run's identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    model: str
    method: str
    config: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSpec
    profile: str = "quick"
    seed: int = 0
    # a local checkpoint folder's files (names, sizes, modification times): the same path
    # retrained, or another project's folder of the same relative name, is another model
    model_fingerprint: str | None = None

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        get_profile(v)
        return v

    def _dump(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data["model_fingerprint"] is None:  # registered names and hub ids: keys as before
            del data["model_fingerprint"]
        for key, default in EVAL_KEYS_SINCE_V1.items():
            if data["eval"].get(key) == default:
                del data["eval"][key]
        train = data["config"].get("train")
        for key, default in TRAIN_KEYS_SINCE_V1.items():
            if isinstance(train, dict) and key in train and train[key] == default:
                del train[key]
        return data

    def canonical_json(self) -> str:
        return _canonical(self._dump())

    @property
    def model_key(self) -> str:
        """The model as caches key it (teacher data): its name, plus the fingerprint of a
        local folder."""
        return self.model + (f"@{self.model_fingerprint}" if self.model_fingerprint else "")

    def spec_hash(self) -> str:
        """sha256 of the spec with the training settings that only say when the run writes
        (:data:`WRITE_ONLY_TRAIN_KEYS`, and activation checkpointing) at their defaults: runs
        differing in them compute the same thing, so a rerun with another
        ``checkpoint_every`` resumes or reuses the run.
        Hashing the defaults, not dropping the keys, keeps earlier runs' hashes."""
        data = self._dump()
        train = data["config"].get("train")
        if isinstance(train, dict):
            from harness.train.config import TrainConfig

            for key in WRITE_ONLY_TRAIN_KEYS:
                if key in TRAIN_KEYS_SINCE_V1:
                    train.pop(key, None)
                elif key in train:
                    train[key] = TrainConfig.model_fields[key].default
        return hashlib.sha256(_canonical(data).encode()).hexdigest()

    @property
    def run_key(self) -> str:
        """Short, stable identity shown to users (first 12 hex digits of the hash)."""
        return self.spec_hash()[:12]

    @property
    def bits(self) -> int | None:
        bits = _find(self.config, "bits")
        return bits if bits is not None else _find(self.config, "weight_bits")

    @property
    def group_size(self) -> int | None:
        return _find(self.config, "group_size")

    @property
    def fmt(self) -> str | None:
        return _find(self.config, "fmt")


def _find(config: dict[str, Any], key: str):
    if key in config:
        return config[key]
    for value in config.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def format_validation_error(exc: ValidationError, what: str) -> str:
    """One line from a pydantic error: which field, what is wrong, what is allowed."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or what
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


def validate_method_config(method_cls, values: dict[str, Any]):
    """Builds ``method_cls.Config(**values)`` turning validation errors into one line."""
    try:
        return method_cls.Config(**values)
    except ValidationError as exc:
        # an unknown key lists the keys valid where it was found (train.* for train.seqlen)
        unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
        where = unknown[0][:-1] if unknown else ()
        model, prefix = method_cls.Config, ""
        for part in where:
            nested = model.model_fields.get(str(part))
            sub = getattr(nested, "annotation", None) if nested else None
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                model, prefix = method_cls.Config, ""
                break
            model, prefix = sub, f"{prefix}{part}."
        fields = ", ".join(prefix + f for f in model.model_fields)
        raise HarnessError(
            format_validation_error(exc, f"{method_cls.name} config")
            + f" (valid keys: {fields})"
        ) from None


Scheduler = Literal["inline", "ray"]
