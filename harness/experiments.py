"""Experiment files: a YAML grid of runs (models x methods x grid axes x seeds).

An experiment file is a typed, validated description of many runs; it expands into the same
:class:`~harness.config.RunSpec` objects ``harness run --methods ...`` builds, through
:func:`harness.plan.build_spec`, so a file and the equivalent flags give identical run hashes
(and therefore share results and resume).

```yaml
name: smollm2-ablation          # stored in the experiments table (default: the file's stem)
model: smollm2-135m             # or models: [a, b]
profile: quick                  # quick | full (default: full with CUDA, else quick)
seeds: [0]                      # or seed: 0
scheduler: ray                  # ray (default) | inline
gpus_per_run: 0.5               # optional Ray GPU fraction per run
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
``--num-fewshot``, ``--allow-code-eval``) override the file.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.config import RunSpec
from harness.errors import HarnessError

#: key inside a method's mapping that holds that method's own grid axes
METHOD_GRID_KEY = "grid"


class EvalSection(BaseModel):
    """Evaluation settings shared by every run of the experiment (profile values otherwise)."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    tasks: list[str] | str | None = None
    limit: int | None = Field(None, gt=0)
    ppl_data: list[str] | str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    allow_code_eval: bool | None = None


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
        return list(self.models or ([self.model] if self.model else ["smollm2-135m"]))

    def seed_list(self) -> list[int]:
        if self.seed is not None and self.seeds:
            raise HarnessError("give either seed or seeds, not both")
        return list(self.seeds or ([self.seed] if self.seed is not None else [0]))


@dataclass
class Experiment:
    """A loaded experiment: what ``harness run FILE`` executes.

    Attributes:
        name: stored in the experiments table.
        path: the file it came from.
        specs: validated run specs (no FP references; ``cmd_run`` adds those).
        scheduler: ``ray`` or ``inline``.
        gpus_per_run: Ray GPU fraction per run from the file (``None``: scheduler default).
    """

    name: str
    path: Path
    specs: list[RunSpec]
    scheduler: str
    gpus_per_run: float | None = None


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


def _axes_for(method: str, axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes that apply to ``method`` (routed like ``--set``)."""
    keys = [k for k in axes if _has_field(method, k)]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in keys))]


def _has_field(method: str, key: str) -> bool:
    from harness.registry import get_method

    return key in get_method(method).Config.model_fields or key in ("bits", "group_size")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge for nested config sections (``train: {steps: ...}``)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_grid_keys(methods: list[str], grid: dict[str, list[Any]], where: str) -> None:
    from harness.commands import _route_overrides

    try:
        _route_overrides(methods, {k: None for k in grid})
    except HarnessError as exc:
        raise HarnessError(f"{where}: {str(exc).replace('--set ', 'grid axis ')}") from None


def expand(file: ExperimentFile, path: Path, cli_args=None, check_model: bool = True
           ) -> list[RunSpec]:
    """Expands the file (plus command-line overrides) into validated run specs, in file order.

    Args:
        file: the parsed file.
        path: its path (for error messages).
        cli_args: ``argparse`` namespace of ``harness run``; set flags override the file.
        check_model: resolve automatic group sizes from the model's config. ``False`` skips
            that (validation of files naming models that are not available offline).

    Raises:
        HarnessError: unknown method, grid axis no method has, invalid config values.
    """
    from harness.commands import _parse_sets
    from harness.config import default_profile
    from harness.models import decoder_in_features
    from harness.plan import build_spec
    from harness.registry import get_method

    a = cli_args
    flag = (lambda name: getattr(a, name, None)) if a is not None else (lambda name: None)
    models = [flag("model")] if flag("model") else file.model_names()
    if flag("seeds") or flag("seed") is not None:
        from harness.commands import seeds_of

        seeds = seeds_of(a)
    else:
        seeds = file.seed_list()
    profile = flag("profile") or file.profile or default_profile()
    eval_over = file.eval.model_dump()
    for key, name in (("max_tokens", "max_eval_tokens"), ("seq_len", "seq_len"),
                      ("tasks", "tasks"), ("limit", "limit"), ("ppl_data", "ppl_data"),
                      ("num_fewshot", "num_fewshot"), ("allow_code_eval", "allow_code_eval")):
        if flag(name) not in (None, False):
            eval_over[key] = flag(name)
    if isinstance(eval_over.get("tasks"), list):
        eval_over["tasks"] = tuple(eval_over["tasks"])

    methods = dict(file.methods)
    if flag("methods"):
        missing = [m for m in flag("methods") if m not in methods]
        if missing:
            raise HarnessError(f"--methods {','.join(missing)}: not in {path} (it has "
                               f"{', '.join(methods)})")
        methods = {m: methods[m] for m in flag("methods")}
    for m in methods:
        try:
            get_method(m)  # unknown method: one line listing the registered ones
        except HarnessError as exc:
            raise HarnessError(f"{path}: methods.{m}: {exc}") from None

    grid = dict(file.grid)
    if flag("bits"):
        grid["bits"] = list(flag("bits"))
    if flag("group_size") is not None:
        grid["group_size"] = [flag("group_size")]
    _check_grid_keys(list(methods), grid, str(path))
    cli_sets = _parse_sets(flag("set") or [])
    if cli_sets:  # a --set key no method of the file has is an error, as with --methods
        from harness.commands import _route_overrides

        _route_overrides(list(methods), cli_sets)

    specs: list[RunSpec] = []
    for model in models:
        in_features = decoder_in_features(model) if check_model else None
        for method, body in methods.items():
            body = dict(body or {})
            own_axes = body.pop(METHOD_GRID_KEY, None) or {}
            if not isinstance(own_axes, dict) or any(
                    not isinstance(v, list) or not v for v in own_axes.values()):
                raise HarnessError(f"{path}: methods.{method}.grid must map keys to non-empty "
                                   f"lists, e.g. grid: {{loss: [fkl, rkl]}}")
            _check_grid_keys([method], own_axes, f"{path}: methods.{method}")
            axes = {**grid, **own_axes}
            method_sets = {k: v for k, v in cli_sets.items() if _has_field(method, k)}
            for point in _axes_for(method, axes):
                over = _merge(_merge(body, point), method_sets)
                for seed in seeds:
                    try:
                        spec = build_spec(model, method, over, profile, seed, eval_over,
                                          in_features)
                    except HarnessError as exc:
                        raise HarnessError(f"{path}: methods.{method}: {exc}") from None
                    if spec not in specs:
                        specs.append(spec)
    return specs


def load_experiment(path: str | Path, cli_args=None, check_model: bool = True) -> Experiment:
    """Reads, validates and expands an experiment file.

    Args:
        path: the YAML file.
        cli_args: ``harness run``'s parsed arguments; flags given there override the file.
        check_model: see :func:`expand`.

    Returns:
        An :class:`Experiment` with ``name``, ``specs``, ``scheduler`` and ``gpus_per_run``.

    Raises:
        HarnessError: any problem with the file, in one line naming the key and the fix.
    """
    path = Path(path)
    file = read_experiment_file(path)
    specs = expand(file, path, cli_args, check_model=check_model)
    if cli_args is not None and getattr(cli_args, "gpus_per_run", None) is None \
            and file.gpus_per_run is not None:
        # cmd_run reads args.gpus_per_run; the file's value applies unless the flag was given.
        cli_args.gpus_per_run = file.gpus_per_run
    return Experiment(name=file.name or path.stem, path=path, specs=specs,
                      scheduler=file.scheduler, gpus_per_run=file.gpus_per_run)
