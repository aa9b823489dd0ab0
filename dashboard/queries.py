"""Read-only queries for the dashboard: ORM selects turned into pandas DataFrames.

Every function takes a :class:`harness.store.Store` (opened with ``readonly=True`` by the app)
and never writes. Failed runs (no metrics), runs without training or layer stats, and an
empty or schema-less database all give empty frames with the documented columns, so a page
can always render.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from harness.errors import HarnessError
from harness.report import ppl_protocol, replicate_key
from harness.stats import intervals_overlap
from harness.store import Artifact, LayerStat, Metric, Run, Store, TrainStep

RUN_COLUMNS = ["id", "run_key", "label", "model", "method", "fmt", "bits", "group_size",
               "profile", "seed", "status", "error", "wall_s", "started_at", "finished_at",
               "device", "host", "attempts", "eval_seq_len", "eval_max_tokens"]
# from each run's spec: with the model, what its perplexity depends on (harness.report)
PROTOCOL_COLUMNS = ("eval_seq_len", "eval_max_tokens")
TRAIN_COLUMNS = ["run_id", "label", "step", "loss", "lr", "tokens_per_s"]
LAYER_COLUMNS = ["run_id", "label", "layer", "module", "stat", "value"]
TASK_COLUMNS = ["run_id", "label", "method", "task", "metric", "value", "stderr", "value_lo",
                "value_hi"]
# Accuracy-like metrics stored with a task column, in order of preference: the headline that
# harness/eval/accuracy.py averages into acc_avg ("acc" for multiple choice, strict match for
# gsm8k, pass@1 for humaneval), so a task's column and the average beside it are one metric.
ACC_METRICS = ("acc", "acc_norm", "exact_match_strict", "pass_at_1")
MEMORY_METRICS = ("size_mb", "bits_per_weight", "compression_vs_fp16", "quantized_bytes",
                  "fp_bytes", "total_bytes", "quantized_weights", "peak_rss_mb", "peak_gpu_mb")
FP_METHOD = "fp"

# --- uncertainty --------------------------------------------------------------------------
# A stored metric ``m`` may come with ``m_ci95_low``/``m_ci95_high`` (PPL: bootstrap over the
# evaluation windows) or ``m_stderr`` (accuracy: lm-eval's standard error). Pages show one
# interval per number, ``m_lo``/``m_hi``: whiskers, the ± in tables and the within-noise rule
# all read those two columns, so what is drawn is what is compared.
CI_LOW, CI_HIGH, STDERR = "_ci95_low", "_ci95_high", "_stderr"
LO, HI, STD, N = "_lo", "_hi", "_std", "_n"
# An accuracy's stderr widened to a 95% normal interval, so accuracy whiskers and the PPL's
# bootstrap CI are the same kind of interval and the within-noise rule treats them alike.
Z95 = 1.96
HELPER_SUFFIXES = (CI_LOW, CI_HIGH, STDERR, LO, HI, STD, N)
BEST = "1 (best)"
WITHIN_NOISE = "≈ best (within noise)"
FP_REFERENCE = "FP reference"
# Bookkeeping columns of a run row that are not measurements (never averaged over seeds).
GROUP_COLUMNS = ["replicate_key", "acc_protocol", "n", "run_ids", "run_keys", "seeds"]


def run_label(method: str, fmt: str | None, bits: int | None, group_size: int | None,
              run_key: str) -> str:
    """Short human name of a run: ``clip int3 g128 · 1a2b3c``."""
    parts = [method]
    if fmt in ("binary", "ternary") or (fmt and fmt[-1].isdigit()):  # the name says the width
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
    df["replicate_key"] = pd.Series([replicate_key(r.spec) for r in rows], index=df.index,
                                    dtype=object)
    df["acc_protocol"] = pd.Series([accuracy_protocol(r.model, r.spec) for r in rows],
                                   index=df.index, dtype=object)
    return df


def accuracy_protocol(model: str, spec: dict | None) -> str:
    """What an average accuracy depends on besides the weights: the model, the task set, the
    example limit and the shots. Runs of different task sets are never ranked together."""
    ev = (spec or {}).get("eval") or {}
    tasks = sorted(ev.get("tasks") or ())
    return json.dumps([model, tasks, ev.get("limit"), ev.get("num_fewshot")], default=str)


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
    fp = fp_reference(df)
    df["ppl_fp"] = df["ppl"] / fp
    tasks = [c for c in (_task_acc_column(df, t) for t in tasks_of(df)) if c]
    if tasks:
        derived = df["acc_avg"].isna()
        df["acc_avg"] = df["acc_avg"].fillna(df[tasks].mean(axis=1, skipna=True))
        errs = [c + STDERR for c in tasks]
        if all(c in df.columns for c in errs):
            # tasks score different examples, so their errors add in quadrature; only where
            # every task has one (a partial sum would understate the spread)
            se = np.sqrt((df[errs] ** 2).sum(axis=1, skipna=False)) / len(tasks)
            old = df[f"acc_avg{STDERR}"] if f"acc_avg{STDERR}" in df.columns else math.nan
            df[f"acc_avg{STDERR}"] = pd.Series(old, index=df.index, dtype=float).where(
                ~derived, se)
    df = with_intervals(df)
    # The FP run's own uncertainty is left out: the ratio's interval is the run's interval
    # scaled by one fixed reference, which is how the ratio itself is read.
    df["ppl_fp" + LO] = df["ppl" + LO] / fp
    df["ppl_fp" + HI] = df["ppl" + HI] / fp
    return df


def with_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``m_lo``/``m_hi`` for every metric ``m`` stored with an interval: its 95% CI, or
    ``m ± 1.96 · m_stderr``. NaN where the run has none (runs stored before intervals existed)
    or only one bound. ``ppl`` always gets the pair, NaN when unknown."""
    df = df.copy()
    new: dict[str, pd.Series] = {}
    for col in list(df.columns):
        if col.endswith(HELPER_SUFFIXES) or col in RUN_COLUMNS or col in GROUP_COLUMNS:
            continue
        value = pd.to_numeric(df[col], errors="coerce").astype(float)
        if col + CI_LOW in df.columns and col + CI_HIGH in df.columns:
            lo = pd.to_numeric(df[col + CI_LOW], errors="coerce").astype(float)
            hi = pd.to_numeric(df[col + CI_HIGH], errors="coerce").astype(float)
        elif col + STDERR in df.columns:
            se = pd.to_numeric(df[col + STDERR], errors="coerce").astype(float)
            lo, hi = value - Z95 * se, value + Z95 * se
        else:
            continue
        known = value.notna() & lo.notna() & hi.notna()
        new[col + LO], new[col + HI] = lo.where(known), hi.where(known)
    for col in ("ppl" + LO, "ppl" + HI):
        new.setdefault(col, pd.Series(math.nan, index=df.index, dtype=float))
    return df.assign(**new)


def ppl_columns(df: pd.DataFrame) -> list[str]:
    """Perplexity columns: ``ppl`` (the main held-out set), then ``ppl_<data set>``."""
    extra = sorted(c for c in df.columns if c.startswith("ppl_") and c != "ppl_fp"
                   and not c.startswith("ppl_fp_") and not c.endswith(HELPER_SUFFIXES)
                   and not c.endswith("_tokens"))
    return [c for c in ["ppl", *extra] if c in df.columns]


# --- replicates ---------------------------------------------------------------------------
def summarize(values: Sequence[float], lows: Sequence[float] | None = None,
              highs: Sequence[float] | None = None) -> dict[str, float]:
    """Mean, std (ddof=1), n and the shown interval of one metric over replicates.

    One value keeps its own interval. Several: ``mean ± w`` per side, ``w`` the wider of the
    std across seeds and the members' mean interval half-width on that side; a std of two
    near-identical seeds would otherwise hide the evaluation's own noise, which every seed
    shares. Members without an interval count only towards the std.

    Returns:
        ``{"value", "std", "n", "lo", "hi"}``; NaN where there is nothing to say.
    """
    v = np.asarray(values, dtype=float)
    lo = np.asarray(lows if lows is not None else [math.nan] * len(v), dtype=float)
    hi = np.asarray(highs if highs is not None else [math.nan] * len(v), dtype=float)
    ok = np.isfinite(v)
    n = int(ok.sum())
    if n == 0:
        return {"value": math.nan, "std": math.nan, "n": 0, "lo": math.nan, "hi": math.nan}
    if n == 1:
        i = int(np.flatnonzero(ok)[0])
        return {"value": float(v[i]), "std": math.nan, "n": 1, "lo": float(lo[i]),
                "hi": float(hi[i])}
    mean, std = float(v[ok].mean()), float(v[ok].std(ddof=1))
    both = ok & np.isfinite(lo) & np.isfinite(hi)
    below = float((v[both] - lo[both]).mean()) if both.any() else 0.0
    above = float((hi[both] - v[both]).mean()) if both.any() else 0.0
    return {"value": mean, "std": std, "n": n, "lo": mean - max(std, below),
            "hi": mean + max(std, above)}


def group_label(label: str, n: int) -> str:
    """``qat int3 g128 (3 seeds) · 1a2b3c``: the first replicate's key keeps it unique."""
    base, _, key = label.rpartition(" · ")
    return f"{base} ({n} seeds) · {key}" if base else f"{label} ({n} seeds)"


def _measured(df: pd.DataFrame) -> list[str]:
    """Metric columns a replicate group averages (not identity, bookkeeping or intervals)."""
    return [c for c in df.columns if c not in RUN_COLUMNS and c not in GROUP_COLUMNS
            and not c.endswith((LO, HI, STD, N))] + ["wall_s"]


def group_replicates(df: pd.DataFrame, by_spec: bool = True) -> pd.DataFrame:
    """One row per replicate group of a run frame (:func:`leaderboard`, or a selection of it).

    Finished runs with the same :func:`replicate_key` form a group; every other run (failed,
    running, without a spec) stays alone. A group row holds the mean of each metric, ``m_std``
    (ddof=1) and ``m_n`` (replicates with a value), ``m_lo``/``m_hi`` per :func:`summarize`,
    and ``n``, ``run_ids``, ``run_keys``, ``seeds``; the identity columns (and ``run_key``, the
    link to a detail page) are its first run's. ``by_spec=False`` keeps every run alone.
    """
    cols = list(df.columns)
    if df.empty:
        out = df.copy()
        for c in ("n", "run_ids", "run_keys", "seeds"):
            out[c] = pd.Series(dtype=object)
        return out
    keys = [k if by_spec and s == "finished" and k is not None else f"run:{i}"
            for k, s, i in zip(df.get("replicate_key", [None] * len(df)), df["status"],
                               df["id"], strict=True)]
    measured = [c for c in _measured(df) if c in cols]
    bases = [c for c in measured if not c.endswith((CI_LOW, CI_HIGH, STDERR))]
    rows = []
    for _, part in df.groupby(pd.Series(keys, index=df.index), sort=False):
        part = part.sort_values("id")
        row = part.iloc[0].to_dict()
        n = len(part)
        row.update(n=n, run_ids=[int(i) for i in part["id"]],
                   run_keys=list(part["run_key"]), seeds=sorted(int(s) for s in part["seed"]))
        for c in measured:
            values = pd.to_numeric(part[c], errors="coerce").astype(float)
            row[c] = float(values.mean()) if values.notna().any() else math.nan
        for c in bases:
            lo = part[c + LO] if c + LO in cols else None
            hi = part[c + HI] if c + HI in cols else None
            summary = summarize(pd.to_numeric(part[c], errors="coerce"), lo, hi)
            row[c], row[c + STD], row[c + N] = summary["value"], summary["std"], summary["n"]
            if lo is not None or n > 1:
                row[c + LO], row[c + HI] = summary["lo"], summary["hi"]
        if n > 1:
            row["label"] = group_label(row["label"], n)
        rows.append(row)
    out = pd.DataFrame.from_records(rows)
    return out.reset_index(drop=True)


def group_scores(scores: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Per-task accuracy (:func:`task_scores`) of the groups of :func:`group_replicates`:
    ``label, method, task, metric, value, value_std, value_n, value_lo, value_hi`` per group
    and task (:func:`summarize` over the group's runs)."""
    cols = ["label", "method", "task", "metric", "value", "value_std", "value_n", "value_lo",
            "value_hi"]
    if scores.empty or groups.empty:
        return pd.DataFrame(columns=cols)
    owner = {rid: (label, method) for label, method, ids in
             zip(groups["label"], groups["method"], groups["run_ids"], strict=True)
             for rid in ids}
    scores = scores[scores["run_id"].isin(list(owner))]
    rows = []
    # groups in the order the caller gave them, tasks sorted: bars line up with the tables
    order = {label: i for i, label in enumerate(groups["label"])}
    keyed = scores.assign(group=[owner[r][0] for r in scores["run_id"]])
    for (label, task), part in keyed.groupby(["group", "task"], sort=False):
        s = summarize(part["value"], part["value_lo"], part["value_hi"])
        rows.append({"label": label, "method": owner[int(part["run_id"].iloc[0])][1],
                     "task": task, "metric": part["metric"].iloc[0], "value": s["value"],
                     "value_std": s["std"], "value_n": s["n"], "value_lo": s["lo"],
                     "value_hi": s["hi"]})
    out = pd.DataFrame.from_records(rows, columns=cols)
    out = out.sort_values(["label", "task"], key=lambda c: c.map(order) if c.name == "label"
                          else c, kind="stable")
    return out[cols].reset_index(drop=True)


# --- within noise --------------------------------------------------------------------------
def within_noise(best: tuple[float, float], other: tuple[float, float]) -> bool:
    """Whether ``other``'s interval overlaps ``best``'s: their difference is within the
    evaluation's noise. An unknown (NaN) bound on either side is never within noise: a run
    without an interval keeps its strict rank rather than being waved through."""
    def known(interval):
        return tuple(interval) if all(np.isfinite(x) for x in interval) else None

    return intervals_overlap(known(best), known(other))


def noise_ranks(values: Sequence[float], lows: Sequence[float], highs: Sequence[float],
                higher_is_better: bool = False) -> list[str]:
    """Rank labels of runs measured under one protocol: :data:`BEST` for the best value,
    :data:`WITHIN_NOISE` where the interval overlaps the best's (:func:`within_noise`), else
    the run's position (``"3"``). Runs without a value get ``""``."""
    v = np.asarray(values, dtype=float)
    lows, highs = np.asarray(lows, dtype=float), np.asarray(highs, dtype=float)
    ok = np.flatnonzero(np.isfinite(v))
    out = [""] * len(v)
    if not len(ok):
        return out
    order = sorted(ok, key=lambda i: (-v[i] if higher_is_better else v[i], i))
    best = (float(lows[order[0]]), float(highs[order[0]]))
    for pos, i in enumerate(order, start=1):
        if pos == 1:
            out[i] = BEST
        elif within_noise(best, (float(lows[i]), float(highs[i]))):
            out[i] = WITHIN_NOISE
        else:
            out[i] = str(pos)
    return out


def rank_column(df: pd.DataFrame, metric: str = "ppl", higher_is_better: bool = False
                ) -> pd.Series:
    """:func:`noise_ranks` of ``metric`` within each evaluation protocol (PPL: model, window,
    token cap; accuracy: model, tasks, limit, shots) over finished quantized rows. FP runs are
    the reference, not contestants; other runs are unranked (``""``)."""
    out = pd.Series("", index=df.index, dtype=object)
    if df.empty or metric not in df.columns:
        return out
    acc = metric.startswith("acc") or "/acc" in metric
    proto = (pd.Series(df["acc_protocol"], index=df.index) if acc and "acc_protocol" in df
             else pd.Series([json.dumps(p, default=str) for p in _protocols(df)], index=df.index))
    fp = (df["method"] == FP_METHOD) & df[metric].notna()
    out[fp] = FP_REFERENCE
    contest = (df["status"] == "finished") & (df["method"] != FP_METHOD)
    lo = df[metric + LO] if metric + LO in df.columns else pd.Series(math.nan, index=df.index)
    hi = df[metric + HI] if metric + HI in df.columns else pd.Series(math.nan, index=df.index)
    for _, idx in df[contest].groupby(proto[contest], sort=False).groups.items():
        ranks = noise_ranks(df.loc[idx, metric], lo[idx], hi[idx], higher_is_better)
        out[idx] = ranks
    return out


def fmt_uncertain(value, lo=math.nan, hi=math.nan, std=math.nan, n=1, digits: int = 2
                  ) -> str | None:
    """A number with its uncertainty: ``31.10 ± 0.46 (n=3)`` for replicates (mean ± std),
    ``31.00 [30.20, 31.90]`` for one run with a 95% interval, ``31.00`` without; None for no
    value (an empty cell)."""
    def f(x) -> str:
        return f"{x:,.{digits}f}" if abs(x) < 1e6 else f"{x:.{digits}e}"

    if value is None or not np.isfinite(float(value)):
        return None
    value = float(value)
    n = 1 if n is None or not np.isfinite(float(n)) else int(n)
    if n > 1 and std is not None and np.isfinite(float(std)):
        return f"{f(value)} ± {f(float(std))} (n={n})"
    if all(x is not None and np.isfinite(float(x)) for x in (lo, hi)):
        return f"{f(value)} [{f(float(lo))}, {f(float(hi))}]"
    return f(value)


def uncertain_column(df: pd.DataFrame, metric: str, digits: int = 2) -> pd.Series:
    """:func:`fmt_uncertain` of ``metric`` for every row of a (grouped) frame; "" where a row
    has no value (a table cell left blank, not "None")."""
    def col(name, default=math.nan):
        return df[name] if name in df.columns else pd.Series(default, index=df.index)

    return pd.Series([fmt_uncertain(v, lo, hi, sd, n, digits) for v, lo, hi, sd, n in
                      zip(col(metric), col(metric + LO), col(metric + HI), col(metric + STD),
                          col(metric + N, 1), strict=True)], index=df.index,
                     dtype=object).fillna("")


def fp_ratio(store: Store) -> pd.DataFrame:
    """PPL over full-precision PPL per finished quantized run: ``model, label, method, bits,
    ppl, ppl_lo, ppl_hi, fp_ppl, ppl_fp, ppl_fp_lo, ppl_fp_hi``. The ratio's interval is the
    run's 95% CI over the FP PPL, the FP run's own uncertainty left out (NaN for runs stored
    without an interval). Runs of models without a finished fp run are left out."""
    df = leaderboard(store)
    cols = ["model", "label", "method", "bits", "ppl", "ppl" + LO, "ppl" + HI, "fp_ppl",
            "ppl_fp", "ppl_fp" + LO, "ppl_fp" + HI]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["fp_ppl"] = fp_reference(df)
    out = df[(df["status"] == "finished") & (df["method"] != FP_METHOD) & df["ppl_fp"].notna()]
    return out[cols].reset_index(drop=True)


def task_scores(store: Store, run_ids: list[int] | None = None) -> pd.DataFrame:
    """Per-task accuracy in long form (``run_id, label, method, task, metric, value``); one
    metric per task (``acc`` when stored, else ``acc_norm``)."""
    everything = metrics_long(store, run_ids)
    m = everything[(everything["task"] != "") & everything["name"].isin(ACC_METRICS)]
    if m.empty:
        return pd.DataFrame(columns=TASK_COLUMNS)
    rank = {name: i for i, name in enumerate(ACC_METRICS)}
    m = m.assign(rank=m["name"].map(rank)).sort_values(["run_id", "task", "rank"])
    m = m.drop_duplicates(["run_id", "task"])
    err = {(r, t, n[:-len(STDERR)]): v for r, t, n, v in
           zip(everything["run_id"], everything["task"], everything["name"], everything["value"],
               strict=True) if n.endswith(STDERR)}
    m = m.assign(stderr=[err.get((r, t, n), math.nan) for r, t, n in
                         zip(m["run_id"], m["task"], m["name"], strict=True)])
    m["stderr"] = pd.to_numeric(m["stderr"], errors="coerce").astype(float)
    known = m["stderr"].notna() & m["value"].notna()
    m["value_lo"] = (m["value"] - Z95 * m["stderr"]).where(known)
    m["value_hi"] = (m["value"] + Z95 * m["stderr"]).where(known)
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
