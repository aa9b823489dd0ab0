"""Turns an experiment (from CLI flags or a YAML file) into validated run specs.

:func:`plan_runs` is the one expansion every ``harness run`` goes through (flags, file, inline
or Ray); :func:`build_spec` makes one spec of it, the unit whose hash is a run's identity.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from harness.config import (
    EvalSpec,
    RunSpec,
    format_validation_error,
    get_profile,
    validate_method_config,
)
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.orchestration.experiments import Experiment

#: Keys every method is given: the ones without such a field (fp, onebit) drop them, so one
#: ``bits`` axis spans a ladder that includes fixed-width methods.
SHARED_KEYS = ("bits", "group_size")


def plan_runs(experiment: Experiment, *, check_model: bool = True) -> list[RunSpec]:
    """Every run of an experiment, each once, in order: the FP references first (unless the
    experiment turns them off or lists ``fp`` itself), then models x methods x grid points x
    seeds, in the order the experiment names them.

    Precedence inside a method's config: its defaults < the profile's training budget < the
    method's own overrides < the grid point < ``--set``.

    Args:
        experiment: from :meth:`~harness.orchestration.experiments.Experiment.from_flags` or
            :meth:`~harness.orchestration.experiments.Experiment.from_yaml`.
        check_model: resolve automatic group sizes from each model's config; ``False`` skips
            that (validating files that name models not available offline).

    Raises:
        HarnessError: unknown method, a grid axis or ``--set`` key no method has, invalid
            config or evaluation values; a file's errors name the file and the method.
    """
    _check_names(experiment)
    specs = _grid_specs(experiment, check_model)
    return _with_fp_references(specs) if experiment.fp_reference else specs


def _check_names(exp: Experiment) -> None:
    """Unknown methods, grid axes and ``--set`` keys fail before any model config is read."""
    from harness.registry import get_method

    source = str(exp.source) if exp.source else None
    methods = list(exp.methods)
    for method in methods:
        with _located(source, f"methods.{method}"):
            get_method(method)  # unknown: one line listing the registered ones
    with _located(source):
        check_keys(methods, exp.grid, "grid axis")
    if exp.sets:
        check_keys(methods, exp.sets, "--set")
    for method, entry in exp.methods.items():
        with _located(source, f"methods.{method}"):
            check_keys([method], entry.grid, "grid axis")


def _grid_specs(exp: Experiment, check_model: bool) -> list[RunSpec]:
    from harness.config import default_profile
    from harness.models import decoder_in_features

    source = str(exp.source) if exp.source else None
    profile = exp.profile or default_profile()
    eval_over = exp.eval.model_dump()
    if isinstance(eval_over.get("tasks"), list):
        eval_over["tasks"] = tuple(eval_over["tasks"])
    specs: list[RunSpec] = []
    for model in exp.models:
        in_features = decoder_in_features(model) if check_model else None
        for method, entry in exp.methods.items():
            keys = method_keys(method)
            sets = {k: v for k, v in exp.sets.items() if k in keys}
            for point in _grid_points(keys, {**exp.grid, **entry.grid}):
                over = deep_merge(deep_merge(entry.config, point), sets)
                for seed in exp.seeds:
                    with _located(source, f"methods.{method}"):
                        spec = build_spec(model, method, over, profile, seed, eval_over,
                                          in_features)
                    # fp drops bits and seed, and a --set can pin an axis: equal points are
                    # one run, not a run done twice
                    if spec not in specs:
                        specs.append(spec)
    return specs


def _with_fp_references(specs: list[RunSpec]) -> list[RunSpec]:
    """One FP run per model and evaluation, ahead of the runs compared with it (unless the
    experiment lists fp itself)."""
    refs: list[RunSpec] = []
    for spec in specs:
        ref = fp_reference(spec)
        if ref not in refs and ref not in specs:
            refs.append(ref)
    return refs + specs


def method_keys(method: str) -> set[str]:
    """The override keys ``method`` takes: its config's fields and :data:`SHARED_KEYS`."""
    from harness.registry import get_method

    return set(get_method(method).Config.model_fields) | set(SHARED_KEYS)


def check_keys(methods: list[str], keys, what: str) -> None:
    """A key no requested method takes would silently change nothing: an error listing the
    valid ones. ``what`` names where the key came from (``--set``, ``grid axis``)."""
    known = set().union(*(method_keys(m) for m in methods))
    for key in keys:
        if key not in known:
            raise HarnessError(f"{what} {key}: no requested method has that setting; valid "
                               f"keys: {', '.join(sorted(known))}")


def _grid_points(keys: set[str], axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes a method takes, in the axes' order."""
    names = [k for k in axes if k in keys]
    return [dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(axes[k] for k in names))]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, so ``train: {steps: 1}`` keeps the other training settings of ``base``."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextmanager
def _located(source: str | None, *where: str) -> Iterator[None]:
    """A file's errors name the file and the key they came from; flags' stay as they are."""
    try:
        yield
    except HarnessError as exc:
        if source is None:
            raise
        raise HarnessError(": ".join((source, *where, str(exc)))) from None


def _profile_train(profile: str) -> dict[str, Any]:
    return get_profile(profile).train.model_dump()


def method_config_values(method_cls, overrides: dict[str, Any], profile: str,
                         in_features: set[int] | None) -> dict[str, Any]:
    """Method config as a plain dict with every default filled in and the group size resolved.

    Precedence: the method's defaults < the profile's training budget < the user's overrides.
    ``bits``/``group_size`` overrides are dropped for methods that have no such field (fp).
    """
    fields = method_cls.Config.model_fields
    values = {k: v for k, v in overrides.items()
              if k in fields or k not in ("bits", "group_size", "fmt")}
    if "train" in fields:
        user_train = dict(values.get("train") or {})
        base = fields["train"].get_default(call_default_factory=True)
        merged = base.model_dump()
        merged.update({k: v for k, v in _profile_train(profile).items() if k in merged})
        merged.update(user_train)
        values["train"] = merged
    if "group_size" in fields and in_features:
        from harness.quant.formats import resolve_group_size

        values["group_size"] = resolve_group_size(in_features, values.get("group_size"))
    config = validate_method_config(method_cls, values)
    if in_features:
        method_cls(config).check_shapes(set(in_features))
    return config.model_dump(mode="json")


def build_spec(model: str, method: str, overrides: dict[str, Any] | None = None,
               profile: str = "quick", seed: int = 0, eval_overrides: dict[str, Any] | None = None,
               in_features: set[int] | None = None) -> RunSpec:
    """One validated :class:`RunSpec`.

    Raises:
        HarnessError: unknown method, invalid config values or group size.
    """
    from harness.registry import get_method

    method_cls = get_method(method)
    eval_values = get_profile(profile).eval.model_dump()
    eval_values.update({k: v for k, v in (eval_overrides or {}).items() if v is not None})
    if isinstance(eval_values.get("tasks"), str):
        eval_values["tasks"] = tuple(t for t in eval_values["tasks"].split(",") if t)
    if eval_values.get("ppl_data") is not None:
        from harness.eval.ppl_data import parse_ppl_data

        eval_values["ppl_data"] = parse_ppl_data(eval_values["ppl_data"])
    try:
        eval_spec = EvalSpec(**eval_values)
    except ValidationError as exc:
        msg = format_validation_error(exc, "evaluation settings")
        if "greater than 0" in msg:
            msg += " (--seq-len, --max-eval-tokens, --limit must be > 0)"
        raise HarnessError(msg) from None
    if eval_spec.tasks:  # an unknown task fails here, before any model work
        from harness.eval.accuracy import check_task_names

        check_task_names(eval_spec.tasks, allow_code_eval=eval_spec.allow_code_eval)
    config = method_config_values(method_cls, dict(overrides or {}), profile, in_features)
    model, fingerprint = model_identity(model)
    # The FP reference does not depend on the seed: one shared run per model and evaluation.
    return RunSpec(model=model, method=method, config=config, eval=eval_spec, profile=profile,
                   seed=seed if method_cls.quantizes else 0, model_fingerprint=fingerprint)


def model_identity(model: str) -> tuple[str, str | None]:
    """``(name, fingerprint)``: a local folder becomes its absolute path and a hash of its
    files' names, sizes and modification times (``./ckpt`` in two projects, or one folder
    retrained, were one model to the run's identity and reused each other's results);
    registered names and Hugging Face ids stay as given, without fingerprint."""
    import hashlib
    from pathlib import Path

    from harness.models import MODELS

    path = Path(model).expanduser()
    if model in MODELS or not path.is_dir():
        return model, None
    path = path.resolve()
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return str(path), h.hexdigest()[:16]


def fp_reference(spec: RunSpec) -> RunSpec:
    """The full-precision run every quantized run is compared with (same model and eval)."""
    ref = build_spec(spec.model, "fp", {}, spec.profile, 0, spec.eval.model_dump())
    # the quantized run's fingerprint, not one taken now: the same checkpoint as it was
    return ref.model_copy(update={"model_fingerprint": spec.model_fingerprint})
