"""Read-only queries for the dashboard: ORM selects turned into pandas DataFrames.

Every function takes a :class:`harness.store.Store` (opened with ``readonly=True`` by the app)
and never writes. Failed runs (no metrics), runs without training or layer stats, and an
empty or schema-less database all give empty frames with the documented columns, so a page
can always render.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from harness.errors import HarnessError
from harness.report import ppl_protocol
from harness.store import Artifact, LayerStat, Metric, Run, Store, TrainStep

RUN_COLUMNS = ["id", "run_key", "label", "model", "method", "fmt", "bits", "group_size",
               "profile", "seed", "status", "error", "wall_s", "started_at", "finished_at",
               "device", "host", "attempts", "eval_seq_len", "eval_max_tokens"]
# from each run's spec: with the model, what its perplexity depends on (harness.report)
PROTOCOL_COLUMNS = ("eval_seq_len", "eval_max_tokens")
TRAIN_COLUMNS = ["run_id", "label", "step", "loss", "lr", "tokens_per_s"]
LAYER_COLUMNS = ["run_id", "label", "layer", "module", "stat", "value"]
TASK_COLUMNS = ["run_id", "label", "method", "task", "metric", "value"]
# Accuracy-like metrics stored with a task column, in order of preference: "acc" first, the
# metric the harness averages into acc_avg (harness/eval/accuracy.py), so a task's column and
# the average shown beside it are the same metric.
ACC_METRICS = ("acc", "acc_norm")
MEMORY_METRICS = ("size_mb", "bits_per_weight", "compression_vs_fp16", "quantized_bytes",
                  "fp_bytes", "total_bytes", "quantized_weights", "peak_rss_mb", "peak_gpu_mb")
FP_METHOD = "fp"


def run_label(method: str, fmt: str | None, bits: int | None, group_size: int | None,
              run_key: str) -> str:
    """Short human name of a run: ``clip int3 g128 · 1a2b3c``."""
    parts = [method]
    if fmt == "binary" or (fmt and fmt[-1].isdigit()):  # nf3, binary: the name says the width
        parts.append(fmt)
    elif bits is not None:
        parts.append(f"{fmt or ''}{bits}".strip())
    if group_size is not None:
        parts.append("row" if group_size == -1 else f"g{group_size}")
    return " ".join(parts) + f" · {run_key[:6]}"


def has_schema(store: Store) -> bool:
    """True when the database holds the harness tables (a fresh file may not).

    Raises:
        HarnessError: the database cannot be read (locked, not a database, unreadable): shown
            as such, not as an empty database.
    """
    try:
        return inspect(store.engine).has_table(Run.__tablename__)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise HarnessError(f"database {store.url} cannot be read ({reason}); check the file "
                           f"and that no other process holds it locked") from None


def data_version(store: Store) -> str:
    """A token that changes whenever the database does; the cache key of every query.

    SQLite: modification times and sizes of the file and its ``-wal``. Other backends: the
    number of runs, the latest ``finished_at``/``started_at``, and the highest id of metrics,
    training steps and layer stats (a rerun replaces metrics and a running training adds steps
    without changing any count of runs).
    """
    path = sqlite_path(store.url)
    if path is not None:
        parts = []
        for suffix in ("", "-wal"):
            p = Path(str(path) + suffix)
            if p.exists():
                st = p.stat()
                parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        return "|".join(parts)
    if not has_schema(store):
        return "empty"
    with store.session() as s:
        n, fin, start = s.execute(select(func.count(Run.id), func.max(Run.finished_at),
                                         func.max(Run.started_at))).one()
        ids = [s.scalar(select(func.max(t.id))) for t in (Metric, TrainStep, LayerStat)]
    return "|".join(str(v) for v in (n, fin, start, *ids))


def _runs(store: Store) -> pd.DataFrame:
    if not has_schema(store):
        return pd.DataFrame(columns=RUN_COLUMNS)
    with store.session() as s:
        rows = s.scalars(select(Run).order_by(Run.id)).all()
    stored = [c for c in RUN_COLUMNS if c not in ("label", *PROTOCOL_COLUMNS)]
    records = [{c: getattr(r, c) for c in stored} for r in rows]
    df = pd.DataFrame.from_records(records, columns=stored)
    df.insert(2, "label", [run_label(r.method, r.fmt, r.bits, r.group_size, r.run_key)
                           for r in rows])
    protocols = [ppl_protocol(r.model, r.spec)[1:] for r in rows]
    for i, col in enumerate(PROTOCOL_COLUMNS):
        df[col] = pd.Series([p[i] for p in protocols], index=df.index, dtype=object)
    return df


def metrics_long(store: Store, run_ids: list[int] | None = None) -> pd.DataFrame:
    """All metrics, one row each: ``run_id, name, task, key, value`` (key = ``task/name``)."""
    cols = ["run_id", "name", "task", "key", "value"]
    if not has_schema(store):
        return pd.DataFrame(columns=cols)
    q = select(Metric.run_id, Metric.name, Metric.task, Metric.value)
    if run_ids is not None:
        q = q.where(Metric.run_id.in_(list(run_ids)))
    with store.session() as s:
        rows = s.execute(q.order_by(Metric.run_id, Metric.task, Metric.name)).all()
    df = pd.DataFrame.from_records([tuple(r) for r in rows],
                                   columns=["run_id", "name", "task", "value"])
    df["task"] = df["task"].fillna("")
    df["key"] = [f"{t}/{n}" if t else n for t, n in zip(df["task"], df["name"], strict=True)]
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df[cols]


def runs_table(store: Store) -> pd.DataFrame:
    """One row per run (every status) with its metrics pivoted into columns.

    Plain metrics become a column of their name (``ppl``, ``size_mb``...), task metrics a
    column ``task/metric`` (``arc_easy/acc``). Runs without metrics keep NaN there.
    """
    runs = _runs(store)
    metrics = metrics_long(store)
    if metrics.empty or runs.empty:
        return runs
    wide = metrics.pivot_table(index="run_id", columns="key", values="value", aggfunc="last",
                               dropna=False)
    wide.columns = [str(c) for c in wide.columns]
    return runs.merge(wide, how="left", left_on="id", right_index=True)


def task_columns(df: pd.DataFrame) -> list[str]:
    """Columns of a :func:`runs_table` frame that hold per-task accuracy (``task/acc...``)."""
    return [c for c in df.columns if "/" in c and c.split("/", 1)[1] in ACC_METRICS]


def tasks_of(df: pd.DataFrame) -> list[str]:
    """The lm-eval tasks present, in order, with the accuracy column chosen for each."""
    return sorted({c.split("/", 1)[0] for c in task_columns(df)})


def _task_acc_column(df: pd.DataFrame, task: str) -> str | None:
    for metric in ACC_METRICS:
        if f"{task}/{metric}" in df.columns:
            return f"{task}/{metric}"
    return None


def _protocols(df: pd.DataFrame) -> list[tuple]:
    return [(m, _none(s), _none(t)) for m, s, t in
            zip(df["model"], df["eval_seq_len"], df["eval_max_tokens"], strict=True)]


def _none(value):
    """pandas turns a missing cap into NaN; the protocol key wants None (as the spec has)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def fp_reference(df: pd.DataFrame) -> pd.Series:
    """Full-precision perplexity per row: the finished ``fp`` run of the same model, window
    and token cap (:func:`harness.report.ppl_protocol`). NaN where there is none: a ratio
    against another protocol's FP would be off by a few percent, silently."""
    if df.empty or "ppl" not in df.columns:
        return pd.Series([math.nan] * len(df), index=df.index, dtype=float)
    fp = df[(df["method"] == FP_METHOD) & (df["status"] == "finished") & df["ppl"].notna()]
    ref = dict(zip(_protocols(fp), fp["ppl"], strict=True))
    return pd.Series([ref.get(p, math.nan) for p in _protocols(df)], index=df.index, dtype=float)


def leaderboard(store: Store) -> pd.DataFrame:
    """The leaderboard: :func:`runs_table` plus ``ppl_fp`` (PPL / FP PPL), ``acc_avg``.

    ``acc_avg`` is the stored metric when present, else the mean of the per-task accuracies.
    Columns that no run has (``ppl``, ``size_mb``, ``bits_per_weight``) exist as NaN.
    """
    df = runs_table(store)
    for col in ("ppl", "size_mb", "bits_per_weight", "acc_avg"):
        if col not in df.columns:
            df[col] = math.nan
    df["ppl_fp"] = df["ppl"] / fp_reference(df)
    tasks = [c for c in (_task_acc_column(df, t) for t in tasks_of(df)) if c]
    if tasks:
        df["acc_avg"] = df["acc_avg"].fillna(df[tasks].mean(axis=1, skipna=True))
    return df


def fp_ratio(store: Store) -> pd.DataFrame:
    """PPL over full-precision PPL per finished quantized run: ``model, label, method, bits,
    ppl, fp_ppl, ppl_fp``. Runs of models without a finished fp run are left out."""
    df = leaderboard(store)
    cols = ["model", "label", "method", "bits", "ppl", "fp_ppl", "ppl_fp"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["fp_ppl"] = fp_reference(df)
    out = df[(df["status"] == "finished") & (df["method"] != FP_METHOD) & df["ppl_fp"].notna()]
    return out[cols].reset_index(drop=True)


def task_scores(store: Store, run_ids: list[int] | None = None) -> pd.DataFrame:
    """Per-task accuracy in long form (``run_id, label, method, task, metric, value``); one
    metric per task (``acc`` when stored, else ``acc_norm``)."""
    m = metrics_long(store, run_ids)
    m = m[(m["task"] != "") & m["name"].isin(ACC_METRICS)]
    if m.empty:
        return pd.DataFrame(columns=TASK_COLUMNS)
    rank = {name: i for i, name in enumerate(ACC_METRICS)}
    m = m.assign(rank=m["name"].map(rank)).sort_values(["run_id", "task", "rank"])
    m = m.drop_duplicates(["run_id", "task"])
    runs = _runs(store)[["id", "label", "method"]]
    out = m.merge(runs, left_on="run_id", right_on="id").rename(columns={"name": "metric"})
    return out[TASK_COLUMNS].reset_index(drop=True)


def train_steps(store: Store, run_ids: list[int]) -> pd.DataFrame:
    """Logged training steps of ``run_ids``: ``run_id, label, step, loss, lr, tokens_per_s``."""
    if not run_ids or not has_schema(store):
        return pd.DataFrame(columns=TRAIN_COLUMNS)
    q = (select(TrainStep.run_id, TrainStep.step, TrainStep.loss, TrainStep.lr,
                TrainStep.tokens_per_s, Run.method, Run.fmt, Run.bits, Run.group_size,
                Run.run_key)
         .join(Run, Run.id == TrainStep.run_id)
         .where(TrainStep.run_id.in_(list(run_ids)))
         .order_by(TrainStep.run_id, TrainStep.step))
    with store.session() as s:
        rows = s.execute(q).all()
    records = [(r.run_id, run_label(r.method, r.fmt, r.bits, r.group_size, r.run_key), r.step,
                r.loss, r.lr, r.tokens_per_s) for r in rows]
    df = pd.DataFrame.from_records(records, columns=TRAIN_COLUMNS)
    for c in ("loss", "lr", "tokens_per_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def runs_with(store: Store, table: str) -> list[int]:
    """Ids of runs that have rows in ``train_steps`` or ``layer_stats``."""
    model = {"train_steps": TrainStep, "layer_stats": LayerStat}[table]
    if not has_schema(store):
        return []
    with store.session() as s:
        return list(s.scalars(select(model.run_id).distinct().order_by(model.run_id)))


def layer_stats(store: Store, run_ids: list[int] | None = None) -> pd.DataFrame:
    """Per-layer statistics: ``run_id, label, layer, module, stat, value``, layers in model
    order (``layers.2`` before ``layers.10``)."""
    if not has_schema(store):
        return pd.DataFrame(columns=LAYER_COLUMNS)
    q = (select(LayerStat.run_id, LayerStat.layer, LayerStat.module, LayerStat.stat,
                LayerStat.value, Run.method, Run.fmt, Run.bits, Run.group_size, Run.run_key)
         .join(Run, Run.id == LayerStat.run_id))
    if run_ids is not None:
        q = q.where(LayerStat.run_id.in_(list(run_ids)))
    with store.session() as s:
        rows = s.execute(q).all()
    records = [(r.run_id, run_label(r.method, r.fmt, r.bits, r.group_size, r.run_key), r.layer,
                r.module, r.stat, r.value) for r in rows]
    df = pd.DataFrame.from_records(records, columns=LAYER_COLUMNS)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    if not df.empty:
        df = df.sort_values(["run_id", "layer", "module", "stat"],
                            key=lambda s: s.map(layer_sort_key) if s.name == "layer" else s)
    return df.reset_index(drop=True)


def layer_sort_key(layer: str) -> tuple:
    """``layers.10`` sorts after ``layers.2``."""
    return tuple(int(p) if p.isdigit() else p for p in str(layer).split("."))


def run_detail(store: Store, ref: str | int) -> dict[str, Any]:
    """Everything about one run for the detail page.

    Returns:
        ``run`` (dict of the row), ``metrics`` (DataFrame ``task, name, value, extra``),
        ``timings`` (``{stage: seconds}`` from ``time_<stage>_s``), ``memory``
        (``{name: value}``), ``artifacts`` (``{kind: path}``), ``train`` (DataFrame),
        ``layers`` (DataFrame).

    Raises:
        HarnessError: no such run (``Store.get_run``'s message).
    """
    run = store.get_run(ref)
    with store.session() as s:
        mrows = s.scalars(select(Metric).where(Metric.run_id == run.id)
                          .order_by(Metric.task, Metric.name)).all()
        arts = {a.kind: a.path for a in s.scalars(select(Artifact)
                                                  .where(Artifact.run_id == run.id))}
    metrics = pd.DataFrame.from_records(
        [(m.task, m.name, m.value, m.extra) for m in mrows],
        columns=["task", "name", "value", "extra"])
    values = {m.name: m.value for m in mrows if not m.task}
    timings = {n[len("time_"):-len("_s")]: v for n, v in values.items()
               if n.startswith("time_") and n.endswith("_s")}
    memory = {n: values[n] for n in MEMORY_METRICS if n in values}
    info = {c: getattr(run, c) for c in RUN_COLUMNS if c not in ("label", *PROTOCOL_COLUMNS)}
    info.update(label=run_label(run.method, run.fmt, run.bits, run.group_size, run.run_key),
                spec=run.spec, versions=run.versions, experiment_id=run.experiment_id,
                spec_hash=run.spec_hash)
    return {"run": info, "metrics": metrics, "timings": timings, "memory": memory,
            "artifacts": arts, "train": train_steps(store, [run.id]),
            "layers": layer_stats(store, [run.id])}


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other backends and in-memory databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database
    if not db or db == ":memory:":
        return None
    if db.startswith("file:"):
        db = db[len("file:"):].split("?", 1)[0]
    return Path(os.path.expanduser(db))
