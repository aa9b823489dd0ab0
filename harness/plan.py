"""Turns what the user asked for (CLI flags or an experiment file) into validated run specs."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from harness.config import (
    EvalSpec,
    RunSpec,
    format_validation_error,
    get_profile,
    validate_method_config,
)
from harness.errors import HarnessError


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
