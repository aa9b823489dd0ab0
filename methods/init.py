"""Where a trained method starts: any post-training method's weights (``init=gptq`` ...).

The trained methods (qat, bitdistiller and the QAT baselines) train latent weights that their
format quantizes by min/max (or absmean) as RTN does. A post-training method whose result is
such a latent weight (``RTN.init_weights``: rtn, clip, gptq, awq, hqq, or a plugin's subclass of
RTN) can therefore be their starting point unchanged: "BitDistiller from a GPTQ start" is
``--set init=gptq``. The starting method is configured from the trained method's own fields
that it shares (format, bits, group size, calibration size, clipping search); ``init_params``
sets the rest (``--set init_params.act_order=true``).

``init=clip`` and ``init=rtn`` are the trained methods' own ``clip=true/false`` and are stored
as such, so they keep the run keys those runs always had.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from harness.errors import HarnessError
from harness.registry import METHODS, get_method
from methods.rtn import RTN

#: the starts spelt as the trained methods' own ``clip`` flag
OWN_STARTS = {"rtn": False, "clip": True}
#: fields of the trained config that are not the starting method's to share
NOT_SHARED = {"clip", "init", "init_params", "detach_scales"}


def normalise_init(values: dict[str, Any]) -> dict[str, Any]:
    """A trained method's raw config with ``init`` resolved against its ``clip`` flag.

    Raises:
        HarnessError: ``init`` together with a ``clip`` that contradicts it.
    """
    init = values.get("init")
    if init is None:
        return values
    if not isinstance(init, str):
        raise HarnessError(f"init={init!r}: name a post-training method, e.g. init=gptq")
    clip_wanted = OWN_STARTS.get(init, False)
    if "clip" in values and bool(values["clip"]) != clip_wanted:
        fix = (f"init={init} is clip={str(clip_wanted).lower()}" if init in OWN_STARTS else
               f"init={init} replaces the clipping initialisation")
        raise HarnessError(f"init={init} with clip={values['clip']}: {fix}; drop clip")
    values = {**values, "clip": clip_wanted}
    if init in OWN_STARTS:
        if values.get("init_params"):
            raise HarnessError(f"init={init} has no init_params (its settings are this "
                               f"method's own clip_* fields); drop init_params")
        values = {k: v for k, v in values.items() if k not in ("init", "init_params")}
    return values


def starting_methods() -> list[str]:
    """Registered methods that can be a start: post-training methods of the weight ladder."""
    return [n for n in METHODS.names() if _is_start(_quiet_class(n))]


def _problem(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _quiet_class(name: str):
    try:
        return get_method(name)
    except HarnessError:  # a broken plugin is not offered as a start
        return None


def _is_start(cls) -> bool:
    # trained methods subclass RTN too; they are the ones with an objective
    return isinstance(cls, type) and issubclass(cls, RTN) and cls.objective is RTN.objective


def build_start(config):
    """The starting method for a trained ``config`` whose ``init`` names one (else ``None``),
    configured from the fields the two share plus ``config.init_params``.

    Raises:
        HarnessError: unknown method, a method without a weight grid to start from (fp,
            onebit, a trained method), or settings the starting method refuses (e.g.
            ``init=hqq`` with fmt=nf3), each in one line with the fix.
    """
    name = config.init
    if name is None:
        return None
    if name not in METHODS:
        raise HarnessError(f"init={name}: no such method; use one of "
                           f"{', '.join(starting_methods())}")
    cls = get_method(name)
    if not _is_start(cls):
        raise HarnessError(f"init={name}: {name} has no weight grid to start training from; "
                           f"use one of {', '.join(starting_methods())}")
    fields = cls.Config.model_fields
    shared = {k: v for k, v in config.model_dump().items() if k in fields and k not in NOT_SHARED}
    try:
        start_config = cls.Config(**{**shared, **config.init_params})
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise HarnessError(f"init={name} refuses these settings: {problems} (its settings, "
                           f"set by this method's fields or init_params: "
                           f"{', '.join(sorted(set(fields) - NOT_SHARED))})") from None
    except HarnessError as exc:
        raise HarnessError(f"init={name}: {exc}") from None
    return cls(start_config)
