"""What to run: an :class:`Experiment`, from a YAML file or from ``harness run``'s flags.

An experiment is a typed, validated description of many runs (models x methods x grid axes x
seeds). A file and the flags build the same :class:`Experiment`, and
:func:`harness.orchestration.plan.plan_runs` alone expands it into run specs, so a file and the equivalent
flags give identical run hashes (and therefore share results and resume).

```yaml
name: smollm2-ablation          # stored in the experiments table (default: the file's stem)
model: smollm2-135m             # or models: [a, b]
profile: quick                  # quick | full (default: full with CUDA, else quick)
seeds: [0]                      # or seed: 0
scheduler: ray                  # ray (default) | inline
gpus_per_run: 0.5               # optional Ray GPU fraction per run (2, 8...: one run on that many GPUs)
workers_per_run: 2              # optional: one run's training on 2 Ray Train workers (FSDP2)
eval: {max_tokens: 16384, seq_len: 2048, tasks: [], limit: null,
       ppl_data: [shakespeare, wikitext2], num_fewshot: null}
methods:                        # method -> config overrides (the method's own fields)
  rtn: {}
  bitdistiller:
    train: {steps: 100}
    grid: {loss: [fkl, rkl]}    # axes for this method only
grid:                           # axes applied to every method that has the field
  bits: [3, 2]
  group_size: [64]
```

Grid axes follow the routing of ``--set``: an axis applies to the methods whose config has that
field (``bits``/``group_size`` are dropped for methods without them, e.g. ``fp``/``onebit``), and
an axis no listed method has is an error. Flags given on the command line (``--model``,
``--methods`` as a filter, ``--bits``, ``--group-size``, ``--set``, ``--profile``, ``--seed``,
``--seeds``, ``--tasks``, ``--limit``, ``--max-eval-tokens``, ``--seq-len``, ``--ppl-data``,
``--num-fewshot``, ``--allow-code-eval``, ``--no-fp``, ``--scheduler``, ``--gpus-per-run``)
override the file (:meth:`Experiment.with_flags`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.errors import HarnessError

#: key inside a method's mapping that holds that method's own grid axes
METHOD_GRID_KEY = "grid"

#: the model of ``harness run`` and of a file without ``model``/``models``
DEFAULT_MODEL = "smollm2-135m"


class EvalSettings(BaseModel):
    """Evaluation settings shared by every run of an experiment (``None``: the profile's value).

    Their values are checked when runs are planned (:class:`~harness.config.EvalSpec`), where
    the profile is known: a cap below one window is only an error against the final window.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int | None = None
    max_tokens: int | None = None
    tasks: list[str] | str | None = None
    limit: int | None = None
    ppl_data: list[str] | str | None = None
    num_fewshot: int | None = None
    allow_code_eval: bool | None = None


class EvalSection(EvalSettings):
    """The ``eval`` mapping of a file: checked on reading, so an error names the file's key."""

    seq_len: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    limit: int | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)


class ExperimentFile(BaseModel):
    """The schema of an experiment YAML file (unknown keys are errors, never ignored)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="experiment name (default: the file's stem)")
    description: str = ""
    model: str | None = None
    models: list[str] | None = None
    profile: Literal["quick", "full"] | None = None
    seed: int | None = None
    seeds: list[int] | None = None
    scheduler: Literal["ray", "inline"] = "ray"
    gpus_per_run: float | None = Field(None, ge=0)
    workers_per_run: int | None = Field(None, ge=1)
    eval: EvalSection = Field(default_factory=EvalSection)
    methods: dict[str, dict[str, Any] | None]
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, v: dict) -> dict:
        if not v:
            raise ValueError("list at least one method, e.g. methods: {rtn: {}}")
        return v

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, v: dict) -> dict:
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return v

    def model_names(self) -> list[str]:
        if self.model and self.models:
            raise HarnessError("give either model or models, not both")
        return list(self.models or ([self.model] if self.model else [DEFAULT_MODEL]))

    def seed_list(self) -> list[int]:
        if self.seed is not None and self.seeds:
            raise HarnessError("give either seed or seeds, not both")
        return list(self.seeds or ([self.seed] if self.seed is not None else [0]))


class MethodEntry(BaseModel):
    """One method of an experiment: overrides of its config and grid axes of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class Experiment(BaseModel):
    """What a ``harness run`` plans, whether a file or flags said it.

    :func:`harness.orchestration.plan.plan_runs` expands it: models x methods x grid points x seeds, each
    method taking the axes and ``sets`` keys its config has, plus the FP references.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="stored in the experiments table; None: flags")
    description: str = ""
    source: Path | None = Field(None, description="the file; its errors name it and the key")
    models: list[str] = Field(default_factory=lambda: [DEFAULT_MODEL], min_length=1)
    methods: dict[str, MethodEntry] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    sets: dict[str, Any] = Field(
        default_factory=dict,
        description="--set overrides: applied last, to every method that has the key")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    profile: Literal["quick", "full"] | None = Field(
        None, description="None: full with CUDA, else quick (decided when planning)")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    fp_reference: bool = Field(True, description="plan the unquantized reference runs too")
    scheduler: Literal["ray", "inline"] = "inline"
    gpus_per_run: float | None = None
    workers_per_run: int | None = None

    @property
    def train_workers(self) -> int | None:
        """Workers one run trains on: ``workers_per_run``, or a whole ``gpus_per_run`` above 1
        (one worker per GPU); None: the run trains in its own process.

        Raises:
            HarnessError: fewer than 1 worker, a fractional GPU count above 1, or both given
                and different.
        """
        if self.workers_per_run is not None and self.workers_per_run < 1:
            raise HarnessError(f"--workers-per-run {self.workers_per_run}: expected 1 or more "
                               f"workers (leave it out to train in the run's own process)")
        gpus = self.gpus_per_run or 0
        if gpus > 1 and gpus != int(gpus):
            raise HarnessError(f"gpus_per_run {gpus:g}: above 1 a run spans whole GPUs; use "
                               f"{int(gpus)} or {int(gpus) + 1}")
        from_gpus = int(gpus) if gpus > 1 else None
        if from_gpus and self.workers_per_run and from_gpus != self.workers_per_run:
            raise HarnessError(f"gpus_per_run {from_gpus} and workers_per_run "
                               f"{self.workers_per_run} disagree; give one")
        return self.workers_per_run or from_gpus

    @classmethod
    def from_yaml(cls, path: str | Path) -> Experiment:
        """Reads and validates an experiment file.

        Raises:
            HarnessError: missing file, malformed YAML, unknown or invalid keys (one line).
        """
        path = Path(path)
        file = read_experiment_file(path)
        return cls(name=file.name or path.stem, description=file.description, source=path,
                   models=file.model_names(), seeds=file.seed_list(),
                   methods={m: _method_entry(m, body, path) for m, body in file.methods.items()},
                   grid=file.grid, profile=file.profile,
                   eval=EvalSettings(**file.eval.model_dump()),
                   scheduler=file.scheduler, gpus_per_run=file.gpus_per_run,
                   workers_per_run=file.workers_per_run)

    @classmethod
    def from_flags(cls, args) -> Experiment:
        """``harness run --methods ...`` without a file: one model, ``--bits`` and
        ``--group-size`` as grid axes, ``--set`` over every method that has the key.

        Raises:
            HarnessError: no methods, a setting given twice, ``--bits`` for fixed-width
                methods only, conflicting or repeated seeds, a malformed ``--set``.
        """
        if not args.methods:
            raise HarnessError("nothing to run; pass --methods (e.g. --methods rtn) or an "
                               "experiment file")
        sets = parse_sets(args.set)
        for key, flag, given in (("bits", "--bits", args.bits),
                                 ("group_size", "--group-size", args.group_size)):
            if key in sets and given not in (None, []):  # one would silently win
                raise HarnessError(f"{key} is given twice ({flag} and --set {key}="
                                   f"{sets[key]}); keep one")
        check_bits_apply(args.methods, args.bits)
        return cls(models=[args.model or DEFAULT_MODEL],
                   methods={m: MethodEntry() for m in args.methods},
                   grid=_flag_axes(args), sets=sets, seeds=seeds_of(args),
                   profile=args.profile, eval=EvalSettings(**eval_flags(args)),
                   fp_reference=not getattr(args, "no_fp", False),
                   scheduler=getattr(args, "scheduler", None) or "inline",
                   gpus_per_run=getattr(args, "gpus_per_run", None),
                   workers_per_run=getattr(args, "workers_per_run", None))

    def with_flags(self, args) -> Experiment:
        """This experiment with ``harness run FILE``'s flags applied: a given flag replaces
        the file's value, ``--methods`` keeps only those of its methods.

        Raises:
            HarnessError: a ``--methods`` entry the file lacks, conflicting or repeated seeds,
                a malformed ``--set``.
        """
        methods = self.methods
        if args.methods:
            missing = [m for m in args.methods if m not in methods]
            if missing:
                raise HarnessError(f"--methods {','.join(missing)}: not in {self.source} (it "
                                   f"has {', '.join(methods)})")
            methods = {m: methods[m] for m in args.methods}
        given_seeds = getattr(args, "seeds", None) or args.seed is not None
        gpus = getattr(args, "gpus_per_run", None)
        workers = getattr(args, "workers_per_run", None)
        return type(self)(**{
            **dict(self),
            "models": [args.model] if args.model else self.models,
            "methods": methods,
            "grid": {**self.grid, **_flag_axes(args)},
            "sets": {**self.sets, **parse_sets(args.set or [])},
            "seeds": seeds_of(args) if given_seeds else self.seeds,
            "profile": args.profile or self.profile,
            "eval": EvalSettings(**{**self.eval.model_dump(), **eval_flags(args)}),
            "fp_reference": self.fp_reference and not getattr(args, "no_fp", False),
            "scheduler": getattr(args, "scheduler", None) or self.scheduler,
            "gpus_per_run": gpus if gpus is not None else self.gpus_per_run,
            "workers_per_run": workers if workers is not None else self.workers_per_run,
        })


def _method_entry(method: str, body: dict[str, Any] | None, path: Path) -> MethodEntry:
    body = dict(body or {})
    own_axes = body.pop(METHOD_GRID_KEY, None) or {}
    if not isinstance(own_axes, dict) or any(
            not isinstance(v, list) or not v for v in own_axes.values()):
        raise HarnessError(f"{path}: methods.{method}.grid must map keys to non-empty lists, "
                           f"e.g. grid: {{loss: [fkl, rkl]}}")
    return MethodEntry(config=body, grid=own_axes)


def _format_error(exc: ValidationError, path: Path) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        where = ".".join(loc) or "file"
        if err["type"] == "extra_forbidden":
            parent = EvalSection if loc[:1] == ["eval"] else ExperimentFile
            parts.append(f"unknown key {where!r} (valid keys: {', '.join(parent.model_fields)})")
        elif err["type"] == "missing":
            parts.append(f"missing key {where!r}")
        else:
            parts.append(f"{where}: {err['msg']}")
    return f"{path}: " + "; ".join(parts)


def read_experiment_file(path: str | Path) -> ExperimentFile:
    """Parses and validates the YAML file.

    Raises:
        HarnessError: missing file, malformed YAML, unknown or invalid keys (one line).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"experiment file {str(path)!r} not found; ship one from experiments/ "
                           f"(e.g. experiments/smoke.yaml) or pass --methods")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HarnessError(f"{path}: malformed YAML{at}: {problem}") from None
    if raw is None:
        raise HarnessError(f"{path} is empty; write a mapping of keys (name, model, methods, "
                           f"grid, ...), e.g. as experiments/smoke.yaml")
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping of keys (name, model, methods, grid, ...), "
                           f"got {type(raw).__name__}")
    try:
        return ExperimentFile(**raw)
    except ValidationError as exc:
        raise HarnessError(_format_error(exc, path)) from None


# --- reading ``harness run``'s flags ---------------------------------------------------------

def parse_sets(items: list[str]) -> dict:
    """``--set a.b=1`` -> ``{"a": {"b": 1}}``; values parsed as JSON, else kept as strings."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise HarnessError(f"--set {item!r} is not KEY=VALUE; e.g. --set loss=rkl")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def seeds_of(args) -> list[int]:
    """``--seeds 0,1,2`` (replicates) or ``--seed N``; both is an error."""
    seeds = getattr(args, "seeds", None)
    if seeds and args.seed is not None:
        raise HarnessError(f"--seed {args.seed} and --seeds {','.join(map(str, seeds))} both "
                           f"given; keep one (--seeds runs one replicate per seed)")
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise HarnessError(f"--seeds {','.join(map(str, seeds))} repeats a seed; list each "
                               f"once")
        return list(seeds)
    return [args.seed or 0]


def eval_flags(args) -> dict[str, Any]:
    """The evaluation flags that were given (0 included: ``--num-fewshot 0`` is zero-shot);
    ``--allow-code-eval`` is a switch, so only its presence says anything."""
    values = {"max_tokens": args.max_eval_tokens, "seq_len": args.seq_len, "tasks": args.tasks,
              "limit": args.limit, "ppl_data": getattr(args, "ppl_data", None),
              "num_fewshot": getattr(args, "num_fewshot", None),
              "allow_code_eval": getattr(args, "allow_code_eval", False) or None}
    return {k: v for k, v in values.items() if v is not None}


def _flag_axes(args) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    if args.bits:
        axes["bits"] = list(args.bits)
    if args.group_size is not None:
        axes["group_size"] = [args.group_size]
    return axes


def check_bits_apply(methods: list[str], bits: list[int] | None) -> None:
    """--bits for methods of a fixed width (onebit) is an error when no requested method takes
    it, and a note when some do (``--methods bitdistiller,onebit --bits 2`` compares 2-bit
    BitDistiller with 1-bit OneBit)."""
    from harness.registry import get_method

    if not bits:
        return
    fields = {m: get_method(m).Config.model_fields for m in methods}
    fixed = [m for m in methods if "bits" not in fields[m] and m != "fp"]
    if not fixed:
        return

    def width(m: str) -> str:
        f = fields[m].get("weight_bits")
        return f"{m} ({f.default} bit{'s' if f.default != 1 else ''})" if f else m

    what = (f"{', '.join(map(width, fixed))} {'has' if len(fixed) == 1 else 'have'} a fixed "
            f"width")
    if all(m in fixed or m == "fp" for m in methods):
        raise HarnessError(f"--bits: {what}; drop --bits")
    print(f"note: --bits applies to {', '.join(m for m in methods if m not in fixed and m != 'fp')}"
          f"; {what}", file=sys.stderr)
