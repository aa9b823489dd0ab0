"""Recorders: where a run's metrics, training steps and layer stats go.

``StoreRecorder`` writes straight to the store (driver process). ``BufferRecorder`` keeps
records in memory so a Ray worker can ship them back and the driver writes them; workers never
write to SQLite concurrently.
"""

from __future__ import annotations

from typing import Any

from harness.api import Recorder


class StoreRecorder(Recorder):
    def __init__(self, store, run_id: int) -> None:
        self.store = store
        self.run_id = run_id

    def metric(self, name: str, value: float, task: str | None = None, **extra: Any) -> None:
        self.store.add_metric(self.run_id, name, _num(value, name), task=task,
                              extra=extra or None)

    def train_step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.store.add_train_step(self.run_id, step, _num(loss, "train loss"), lr, tokens_per_s)

    def layer_stat(self, layer: str, module: str, stat: str, value: float) -> None:
        self.store.add_layer_stat(self.run_id, layer, module, stat,
                                 _num(value, f"{stat} of {layer}.{module}"))

    def artifact(self, kind: str, path: str) -> None:
        self.store.add_artifact(self.run_id, kind, path)

    def series(self, name: str, values, task: str | None = None) -> None:
        self.store.add_series(self.run_id, name, _floats(values, name), task=task)

    def resume_from(self, step: int) -> None:
        self.store.truncate_train_steps(self.run_id, step)


class BufferRecorder(Recorder):
    """Collects records as ``(kind, kwargs)`` tuples; ``replay`` writes them to a store."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def metric(self, name, value, task=None, **extra):
        self.records.append(("metric", dict(name=name, value=_num(value, name), task=task,
                                            extra=extra or None)))

    def train_step(self, step, loss, lr, tokens_per_s):
        self.records.append(("train_step", dict(step=step, loss=_num(loss, "train loss"), lr=lr,
                                                tokens_per_s=tokens_per_s)))

    def layer_stat(self, layer, module, stat, value):
        self.records.append(("layer_stat", dict(layer=layer, module=module, stat=stat,
                                                value=_num(value, f"{stat} of {layer}.{module}"))))

    def artifact(self, kind, path):
        self.records.append(("artifact", dict(kind=kind, path=path)))

    def series(self, name, values, task=None):
        self.records.append(("series", dict(name=name, values=_floats(values, name), task=task)))

    def resume_from(self, step):
        self.records.append(("resume_from", dict(step=step)))

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.records = self.records, []
        return out


def replay(records, store, run_id: int) -> None:
    """Writes buffered records to ``store`` for ``run_id`` (driver side)."""
    rec = StoreRecorder(store, run_id)
    for kind, kw in records:
        if kind == "metric":
            store.add_metric(run_id, kw["name"], kw["value"], task=kw["task"], extra=kw["extra"])
        elif kind == "resume_from":
            rec.resume_from(kw["step"])
        else:
            getattr(rec, kind)(**kw)


def _num(value, name: str):
    """Plain float for the database (tensors, numpy scalars); inf and NaN stay floats (SQLite
    itself stores NaN as NULL), None stays "not measured".

    Raises:
        TypeError: a value that is not a number: a bug in whatever recorded it, named here
            rather than stored as a silent NULL.
    """
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise TypeError(f"metric {name!r}: {type(value).__name__} value {value!r:.80} is not a "
                        f"number") from None


def _floats(values, name: str) -> list[float]:
    """A plain list of floats (tensors, numpy arrays, lists of bools)."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [_num(v, name) for v in values]
