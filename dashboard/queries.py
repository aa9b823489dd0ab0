"""Read-only queries for the dashboard: SQLAlchemy ``select()`` in, pandas DataFrames out.

Every function takes an :class:`~sqlalchemy.engine.Engine` (opened read-only by the app) and
never writes. The pure helpers below the queries (``build_leaderboard``, ``add_ppl_vs_fp``,
``run_labels``, ``accuracy_long``) work on DataFrames only, so they are tested without a
database. No SQL is built from strings.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine

from harness.store import Artifact, LayerStat, Metric, Run, TrainStep

#: Run columns read for every page (``spec`` is the JSON RunSpec).
RUN_COLUMNS = ("id", "run_key", "model", "method", "fmt", "bits", "group_size", "profile",
               "seed", "status", "error", "created_at", "started_at", "finished_at", "wall_s",
               "attempts", "host", "device", "experiment_id", "spec")

#: Untasked metrics shown as leaderboard / compare columns, in display order.
SCALAR_METRICS = ("ppl", "size_mb", "bits_per_weight", "compression_vs_fp16", "total_bytes",
                  "quantized_bytes", "fp_bytes", "peak_rss_mb", "peak_gpu_mb", "time_load_s",
                  "time_prepare_s", "time_train_s", "time_finalize_s", "time_eval_s",
                  "eval_tokens_per_s", "final_train_loss", "acc_avg", "ppl_tokens", "cakld_gamma")

#: The accuracy metric of a task shown per task (``acc_norm`` is kept in the run detail).
ACC_METRIC = "acc"
ACC_PREFIX = "acc:"


# --- queries ---------------------------------------------------------------------------------
def has_results_schema(engine: Engine) -> bool:
    """True when the database holds the harness tables (an empty file has none)."""
    return inspect(engine).has_table(Run.__tablename__)


def data_version(engine: Engine) -> tuple:
    """A cheap fingerprint of the database's last change, used as the cache key.

    Row counts plus the latest run timestamps: a new run, a finished run, a new metric,
    training step or layer statistic all change it. A database without the harness
    tables has version ``("no-schema",)``.
    """
    if not has_results_schema(engine):
        return ("no-schema",)
    with engine.connect() as conn:
        runs = conn.execute(select(func.count(Run.id), func.max(Run.created_at),
                                   func.max(Run.started_at), func.max(Run.finished_at),
                                   func.sum(Run.attempts))).one()
        counts = tuple(conn.scalar(select(func.count(col)))
                       for col in (Metric.id, TrainStep.id, LayerStat.id, Artifact.id))
    return tuple(str(v) for v in runs) + counts


def runs(engine: Engine) -> pd.DataFrame:
    """One row per run (all statuses), ordered by id; columns :data:`RUN_COLUMNS`."""
    cols = [getattr(Run, c) for c in RUN_COLUMNS]
    with engine.connect() as conn:
        rows = conn.execute(select(*cols).order_by(Run.id)).all()
    df = pd.DataFrame([tuple(r) for r in rows], columns=list(RUN_COLUMNS))
    return df.astype({"id": "int64"}) if len(df) else df


def metrics(engine: Engine, run_ids: list[int] | None = None) -> pd.DataFrame:
    """Long table of metrics: ``run_id, name, task, value, extra`` (task '' when none)."""
    q = select(Metric.run_id, Metric.name, Metric.task, Metric.value, Metric.extra)
    if run_ids is not None:
        q = q.where(Metric.run_id.in_([int(i) for i in run_ids]))
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(Metric.run_id, Metric.task, Metric.name)).all()
    df = pd.DataFrame([tuple(r) for r in rows], columns=["run_id", "name", "task", "value", "extra"])
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    return df


def train_steps(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """Training log of the given runs: ``run_id, step, loss, lr, tokens_per_s``."""
    q = (select(TrainStep.run_id, TrainStep.step, TrainStep.loss, TrainStep.lr,
                TrainStep.tokens_per_s)
         .where(TrainStep.run_id.in_([int(i) for i in run_ids]))
         .order_by(TrainStep.run_id, TrainStep.step))
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    df = pd.DataFrame([tuple(r) for r in rows],
                      columns=["run_id", "step", "loss", "lr", "tokens_per_s"])
    for col in ("loss", "lr", "tokens_per_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def layer_stats(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """Per-layer, per-module statistics: ``run_id, layer, module, stat, value``."""
    q = (select(LayerStat.run_id, LayerStat.layer, LayerStat.module, LayerStat.stat,
                LayerStat.value)
         .where(LayerStat.run_id.in_([int(i) for i in run_ids])))
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    df = pd.DataFrame([tuple(r) for r in rows],
                      columns=["run_id", "layer", "module", "stat", "value"])
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    return df


def layer_stat_runs(engine: Engine) -> dict[int, list[str]]:
    """``{run_id: [stat, ...]}`` for runs that logged layer statistics."""
    with engine.connect() as conn:
        rows = conn.execute(select(LayerStat.run_id, LayerStat.stat).distinct()
                            .order_by(LayerStat.run_id, LayerStat.stat)).all()
    out: dict[int, list[str]] = {}
    for run_id, stat in rows:
        out.setdefault(int(run_id), []).append(stat)
    return out


def train_step_runs(engine: Engine) -> list[int]:
    """Ids of runs with at least one logged training step."""
    with engine.connect() as conn:
        return [int(r) for r in conn.scalars(select(TrainStep.run_id).distinct()
                                             .order_by(TrainStep.run_id))]


def artifacts(engine: Engine, run_id: int) -> pd.DataFrame:
    """``kind, path`` of the files a run wrote."""
    with engine.connect() as conn:
        rows = conn.execute(select(Artifact.kind, Artifact.path)
                            .where(Artifact.run_id == int(run_id))
                            .order_by(Artifact.kind)).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=["kind", "path"])


def leaderboard(engine: Engine) -> pd.DataFrame:
    """Runs joined with their metrics, one row per run; see :func:`build_leaderboard`."""
    return build_leaderboard(runs(engine), metrics(engine))


# --- pure helpers ----------------------------------------------------------------------------
def build_leaderboard(runs_df: pd.DataFrame, metrics_df: pd.DataFrame) -> pd.DataFrame:
    """Wide table: run columns, one column per untasked metric, ``acc:<task>`` per task.

    Adds ``ppl_fp`` (PPL / PPL of the same model's finished ``fp`` run, see
    :func:`add_ppl_vs_fp`), ``acc_avg`` (stored, else the mean of the task accuracies) and
    ``label`` (see :func:`run_labels`). Runs without metrics (failed, pending) keep NaN.

    Args:
        runs_df: from :func:`runs`.
        metrics_df: from :func:`metrics`.

    Returns:
        One row per run, in run id order.
    """
    board = runs_df.copy()
    m = metrics_df
    untasked = m[m["task"] == ""]
    wide = untasked.pivot_table(index="run_id", columns="name", values="value",
                                aggfunc="last", dropna=False)
    tasked = m[(m["task"] != "") & (m["name"] == ACC_METRIC)]
    acc = tasked.pivot_table(index="run_id", columns="task", values="value", aggfunc="last",
                             dropna=False)
    acc.columns = [ACC_PREFIX + str(c) for c in acc.columns]
    board = board.merge(wide, how="left", left_on="id", right_index=True)
    board = board.merge(acc, how="left", left_on="id", right_index=True)
    for name in ("ppl", "size_mb", "bits_per_weight", "acc_avg"):
        if name not in board:
            board[name] = float("nan")
    acc_cols = accuracy_columns(board)
    if acc_cols:
        mean = board[acc_cols].mean(axis=1, skipna=True)
        board["acc_avg"] = board["acc_avg"].where(board["acc_avg"].notna(), mean)
    board = add_ppl_vs_fp(board)
    board["label"] = run_labels(board)
    return board.reset_index(drop=True)


def accuracy_columns(board: pd.DataFrame) -> list[str]:
    """The ``acc:<task>`` columns of a leaderboard, sorted by task."""
    return sorted(c for c in board.columns if isinstance(c, str) and c.startswith(ACC_PREFIX))


def _eval_key(spec: Any) -> tuple:
    ev = spec.get("eval", {}) if isinstance(spec, dict) else {}
    return (ev.get("seq_len"), ev.get("max_tokens"))


def add_ppl_vs_fp(board: pd.DataFrame) -> pd.DataFrame:
    """Adds ``ppl_fp`` = ppl / ppl of the finished ``fp`` run of the same model.

    The reference is the fp run with the same perplexity settings (window and token cap from
    the spec's ``eval``) when there is one, else the latest finished fp run of the model.
    Without a reference, or with a non-finite PPL, ``ppl_fp`` is NaN (inf stays inf).
    """
    board = board.copy()
    ref_exact: dict[tuple, float] = {}
    ref_model: dict[str, float] = {}
    fps = board[(board["method"] == "fp") & (board["status"] == "finished")]
    for _, row in fps.sort_values("id").iterrows():
        ppl = row.get("ppl")
        if ppl is None or not math.isfinite(ppl) or ppl <= 0:
            continue
        ref_exact[(row["model"], *_eval_key(row.get("spec")))] = float(ppl)
        ref_model[row["model"]] = float(ppl)

    def ratio(row) -> float:
        ref = ref_exact.get((row["model"], *_eval_key(row.get("spec"))),
                            ref_model.get(row["model"]))
        ppl = row.get("ppl")
        if ref is None or ppl is None or pd.isna(ppl):
            return float("nan")
        return float(ppl) / ref

    board["ppl_fp"] = [ratio(r) for _, r in board.iterrows()] if len(board) else []
    board["ppl_fp"] = board["ppl_fp"].astype("float64")
    return board


def run_labels(board: pd.DataFrame) -> pd.Series:
    """Short unique names for charts: ``rtn w3 g64``, ``fp``; key suffix on clashes.

    The model is prefixed when the table holds more than one model.
    """
    many_models = board["model"].nunique() > 1 if len(board) else False
    labels = []
    for _, row in board.iterrows():
        parts = [str(row["method"])]
        if row["method"] != "fp":
            if pd.notna(row.get("bits")):
                parts.append(f"w{int(row['bits'])}")
            if pd.notna(row.get("group_size")):
                g = int(row["group_size"])
                parts.append("row" if g == -1 else f"g{g}")
            if row.get("fmt") not in (None, "int") and pd.notna(row.get("fmt")):
                parts.append(str(row["fmt"]))
        label = " ".join(parts)
        if many_models:
            label = f"{_short_model(str(row['model']))} · {label}"
        labels.append(label)
    s = pd.Series(labels, index=board.index, dtype="object")
    dup = s.duplicated(keep=False)
    if dup.any():
        s[dup] = [f"{lab} [{key[:6]}]" for lab, key in zip(s[dup], board.loc[dup, "run_key"],
                                                             strict=True)]
    return s


def _short_model(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def accuracy_long(board: pd.DataFrame) -> pd.DataFrame:
    """``label, run_id, method, task, acc`` rows from a leaderboard (NaN accuracies dropped)."""
    cols = accuracy_columns(board)
    if not cols or board.empty:
        return pd.DataFrame(columns=["label", "run_id", "method", "task", "acc"])
    long = board[["label", "id", "method", *cols]].melt(
        id_vars=["label", "id", "method"], value_vars=cols, var_name="task", value_name="acc")
    long["task"] = long["task"].str.removeprefix(ACC_PREFIX)
    long = long.rename(columns={"id": "run_id"}).dropna(subset=["acc"])
    return long.reset_index(drop=True)


def find_run(board: pd.DataFrame, ref: str | int | None) -> pd.Series | None:
    """The leaderboard row for a run id, run key or unique key prefix; None when absent."""
    if ref is None or board.empty:
        return None
    ref = str(ref).strip()
    if ref.isdigit() and (board["id"] == int(ref)).any():
        return board[board["id"] == int(ref)].iloc[0]
    hits = board[board["run_key"].str.startswith(ref)] if ref else board.iloc[0:0]
    return hits.iloc[0] if len(hits) == 1 else None
