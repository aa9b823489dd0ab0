"""Pure chart builders: DataFrame in, plotly Figure out (no Streamlit, no database).

Each builder accepts the frames :mod:`dashboard.queries` returns, tolerates empty input (an
empty figure with a note), and puts perplexity on a log axis when it spans more than
:data:`LOG_SPAN` — a 2-bit RTN run is often 1000x worse than full precision.

Bars and points carry whiskers (plotly ``error_y``) from the frame's ``<metric>_lo`` /
``<metric>_hi`` columns (:func:`dashboard.queries.with_intervals`, ``group_replicates``).
A row without an interval goes into a trace of its own without ``error_y``: plotly draws a
missing entry of an error array as a zero-length whisker, which reads as "no uncertainty".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.queries import layer_sort_key, uncertain_column

LOG_SPAN = 20.0
# Before/after pairs of per-layer stats (methods/clip.py, methods/onebit.py).
STAT_PAIRS = (("rtn_output_mse", "clip_output_mse"), ("svd_rank1_error", "svid_error"))
METRIC_TITLES = {
    "ppl": "Perplexity", "ppl_fp": "PPL / FP", "size_mb": "Size (MB)",
    "bits_per_weight": "Bits / weight", "acc_avg": "Accuracy (avg)",
    "compression_vs_fp16": "Compression vs fp16", "wall_s": "Wall time (s)",
    "peak_rss_mb": "Peak RSS (MB)", "peak_gpu_mb": "Peak GPU (MB)",
    "loss": "Loss", "lr": "Learning rate", "tokens_per_s": "Tokens / s",
}
TEMPLATE = "plotly_white"


def title_of(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)


def needs_log(values) -> bool:
    """True when positive ``values`` span more than :data:`LOG_SPAN` (max / min)."""
    v = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and float(v.max() / v.min()) > LOG_SPAN


def _empty(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14))
    fig.update_layout(template=TEMPLATE, xaxis_visible=False, yaxis_visible=False, height=300)
    return fig


def _finite(df: pd.DataFrame, col: str) -> pd.DataFrame:
    v = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df[np.isfinite(v)]


def error_arrays(df: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(plus, minus)`` whisker lengths of ``metric`` per row: ``hi - value`` and
    ``value - lo`` from its ``_lo``/``_hi`` columns. NaN where no interval is known, and where
    it has zero width (a constant over seeds, e.g. size): neither gets a whisker."""
    value = pd.to_numeric(df[metric], errors="coerce").to_numpy(dtype=float)
    nan = np.full(len(df), np.nan)
    lo = (pd.to_numeric(df[metric + "_lo"], errors="coerce").to_numpy(dtype=float)
          if metric + "_lo" in df.columns else nan)
    hi = (pd.to_numeric(df[metric + "_hi"], errors="coerce").to_numpy(dtype=float)
          if metric + "_hi" in df.columns else nan)
    # a bootstrap bound can sit a hair on the wrong side of the point estimate: no negative
    # whisker lengths
    plus, minus = np.clip(hi - value, 0, None), np.clip(value - lo, 0, None)
    unknown = ~(np.isfinite(plus) & np.isfinite(minus)) | ((plus == 0) & (minus == 0))
    plus[unknown], minus[unknown] = np.nan, np.nan
    return plus, minus


def error_y(plus, minus) -> dict:
    """plotly ``error_y`` of whisker lengths; symmetric (accuracy's ± stderr) when equal."""
    plus, minus = np.asarray(plus, dtype=float), np.asarray(minus, dtype=float)
    if np.allclose(plus, minus):
        return dict(type="data", array=plus, symmetric=True, visible=True, thickness=1.5)
    return dict(type="data", array=plus, arrayminus=minus, symmetric=False, visible=True,
                thickness=1.5)


def with_whiskers(part: pd.DataFrame, metric: str) -> list[tuple[pd.DataFrame, dict | None]]:
    """``part`` split into the rows with an interval (and their ``error_y``) and those
    without (None): one trace each, never a zero-length whisker."""
    plus, minus = error_arrays(part, metric)
    known = np.isfinite(plus)
    out: list[tuple[pd.DataFrame, dict | None]] = []
    if known.any():
        out.append((part[known], error_y(plus[known], minus[known])))
    if (~known).any():
        out.append((part[~known], None))
    return out


def _hover(part: pd.DataFrame, metric: str, digits: int) -> list[str]:
    return list(uncertain_column(part, metric, digits).fillna(""))


def _digits(metric: str) -> int:
    return 3 if metric == "ppl_fp" or "acc" in metric or metric == "bits_per_weight" else 2


def metric_bars(df: pd.DataFrame, metrics: Sequence[str], label: str = "label",
                color: str = "method") -> go.Figure:
    """One panel per metric, one bar per run or replicate group (coloured by method), with a
    whisker where an interval is known; log axis where PPL explodes.

    Args:
        df: a leaderboard frame (one row per run) or ``queries.group_replicates`` of one.
        metrics: columns to show, e.g. ``["ppl", "size_mb", "acc_avg"]``.
    """
    metrics = [m for m in metrics if m in df.columns]
    if df.empty or not metrics:
        return _empty("no runs with these metrics")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[title_of(m) for m in metrics],
                        horizontal_spacing=0.08 if len(metrics) > 1 else 0.0)
    palette = _palette(df[color].astype(str).unique())
    shown: set[str] = set()
    for i, metric in enumerate(metrics, start=1):
        sub = _finite(df, metric)
        for group, part in sub.groupby(sub[color].astype(str), sort=False):
            for rows, err in with_whiskers(part, metric):
                # one offset group per panel: each label has one bar, so bars of different
                # traces (methods, with/without whisker) need no side-by-side slots
                fig.add_trace(go.Bar(x=rows[label], y=rows[metric], name=group,
                                     marker_color=palette[group], legendgroup=group,
                                     showlegend=group not in shown, error_y=err,
                                     offsetgroup=f"p{i}",
                                     customdata=_hover(rows, metric, _digits(metric)),
                                     hovertemplate="%{x}<br>%{customdata}<extra>" + group
                                                   + "</extra>"),
                              row=1, col=i)
                shown.add(group)
        if needs_log(sub[metric]):
            fig.update_yaxes(type="log", dtick=1, row=1, col=i)
    fig.update_layout(template=TEMPLATE, barmode="group", height=420,
                      margin=dict(t=60, b=10), legend_title_text=color)
    fig.update_xaxes(tickangle=-35)
    return fig


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated in (smaller ``x``, smaller ``y``), sorted by ``x``."""
    pts = _finite(_finite(df, x), y).sort_values([x, y])
    keep, best = [], math.inf
    for idx, val in zip(pts.index, pts[y], strict=True):
        if val < best:
            keep.append(idx)
            best = val
    return pts.loc[keep]


def pareto_scatter(df: pd.DataFrame, x: str = "size_mb", y: str = "ppl", label: str = "label",
                   color: str = "method") -> go.Figure:
    """``y`` (perplexity) against ``x`` (model size) per run or replicate group, with the
    Pareto front drawn and ``y``'s whisker where an interval is known.

    Lower-left is better; the line joins runs no other run beats on both axes (on the point
    values: a front through means, not through the whiskers).
    """
    if df.empty or x not in df.columns or y not in df.columns:
        return _empty("no finished runs with size and perplexity")
    pts = _finite(_finite(df, x), y)
    if pts.empty:
        return _empty("no finished runs with size and perplexity")
    fig = go.Figure()
    palette = _palette(pts[color].astype(str).unique())
    for group, part in pts.groupby(pts[color].astype(str), sort=False):
        for n, (rows, err) in enumerate(with_whiskers(part, y)):
            fig.add_trace(go.Scatter(
                x=rows[x], y=rows[y], mode="markers", name=group, text=rows[label],
                legendgroup=group, showlegend=n == 0, error_y=err,
                customdata=_hover(rows, y, _digits(y)),
                marker=dict(size=12, color=palette[group], line=dict(width=1, color="white")),
                hovertemplate="%{text}<br>" + title_of(x) + " %{x:.4g}<br>" + title_of(y)
                              + " %{customdata}<extra></extra>"))
    front = pareto_front(pts, x, y)
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front",
                             line=dict(color="#444", dash="dash", shape="hv"),
                             hoverinfo="skip"))
    fig.update_layout(template=TEMPLATE, height=450, xaxis_title=title_of(x),
                      yaxis_title=title_of(y) + (" (log)" if needs_log(pts[y]) else ""),
                      legend_title_text=color)
    if needs_log(pts[y]):
        fig.update_yaxes(type="log", dtick=1)
    return fig


def accuracy_bars(scores: pd.DataFrame, label: str = "label") -> go.Figure:
    """Per-task accuracy, one bar per run or replicate group and task, with a whisker where
    a standard error is known (``queries.task_scores``, or ``queries.group_scores`` of it).

    Bars, not a radar: a polar trace has no error bars, and the uncertainty is the point.
    """
    if scores.empty:
        return _empty("no task accuracy stored; run with --tasks")
    palette = _palette(scores[label].astype(str).unique())
    fig = go.Figure()
    for name, part in scores.groupby(scores[label].astype(str), sort=False):
        for n, (rows, err) in enumerate(with_whiskers(part, "value")):
            # one offset group per run: its tasks with and without a whisker share a slot
            fig.add_trace(go.Bar(x=rows["task"], y=rows["value"], name=name, legendgroup=name,
                                 showlegend=n == 0, error_y=err, offsetgroup=name,
                                 marker_color=palette[name],
                                 customdata=_hover(rows, "value", 3),
                                 hovertemplate="%{x}<br>%{customdata}<extra>" + name
                                               + "</extra>"))
    tops = [scores[c].to_numpy(dtype=float) for c in ("value", "value_hi") if c in scores]
    top = float(np.nanmax(np.concatenate(tops)))
    fig.update_layout(template=TEMPLATE, barmode="group", height=420,
                      xaxis=dict(categoryorder="category ascending"),
                      yaxis=dict(title="accuracy", range=[0, max(1.0, top)]))
    return fig


def training_curves(steps: pd.DataFrame, label: str = "label",
                    series: Sequence[str] = ("loss", "lr", "tokens_per_s")) -> go.Figure:
    """Loss, learning rate and throughput against step, runs overlaid (``queries.train_steps``)."""
    if steps.empty:
        return _empty("no training steps logged for these runs")
    fig = make_subplots(rows=len(series), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[title_of(s) for s in series])
    palette = _palette(steps[label].astype(str).unique())
    for name, part in steps.groupby(steps[label].astype(str), sort=False):
        for row, col in enumerate(series, start=1):
            fig.add_trace(go.Scatter(x=part["step"], y=part[col], mode="lines", name=name,
                                     legendgroup=name, showlegend=row == 1,
                                     line=dict(color=palette[name])), row=row, col=1)
    for row, col in enumerate(series, start=1):
        v = pd.to_numeric(steps[col], errors="coerce").astype(float)
        v = v[np.isfinite(v)]
        if len(v) and v.max() == v.min() and v.max() > 0:  # constant (e.g. lr): show it, not ±1
            fig.update_yaxes(range=[0, 2 * float(v.max())], row=row, col=1)
        if col == "lr":
            fig.update_yaxes(exponentformat="e", row=row, col=1)
    if needs_log(steps["loss"]):
        fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="step", row=len(series), col=1)
    fig.update_layout(template=TEMPLATE, height=250 * len(series), margin=dict(t=50))
    return fig


def _matrix(stats: pd.DataFrame, stat: str) -> pd.DataFrame:
    part = stats[stats["stat"] == stat]
    if part.empty:
        return pd.DataFrame()
    m = part.pivot_table(index="layer", columns="module", values="value", aggfunc="mean")
    return m.loc[sorted(m.index, key=layer_sort_key)]


def layer_heatmap(stats: pd.DataFrame, stats_shown: Sequence[str] | None = None) -> go.Figure:
    """Layer x module heatmaps of per-layer error, side by side with one colour scale.

    Args:
        stats: a ``queries.layer_stats`` frame for one run.
        stats_shown: which stats; default the before/after pair the run has
            (``rtn_output_mse``/``clip_output_mse`` or ``svd_rank1_error``/``svid_error``),
            else every stat. Colours are log10 of the value (errors span decades).
    """
    if stats.empty:
        return _empty("no per-layer stats for this run")
    present = list(dict.fromkeys(stats["stat"]))
    if stats_shown is None:
        stats_shown = next(([a, b] for a, b in STAT_PAIRS if a in present and b in present),
                           present)
    mats = [(s, _matrix(stats, s)) for s in stats_shown]
    mats = [(s, m) for s, m in mats if not m.empty]
    if not mats:
        return _empty("no per-layer stats for this run")
    logs = [np.log10(m.where(m > 0)) for _, m in mats]
    finite = np.concatenate([v.to_numpy(dtype=float).ravel() for v in logs])
    finite = finite[np.isfinite(finite)]
    zmin, zmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = make_subplots(rows=1, cols=len(mats), subplot_titles=[s for s, _ in mats],
                        shared_yaxes=True, horizontal_spacing=0.04)
    for i, ((name, m), lg) in enumerate(zip(mats, logs, strict=True), start=1):
        fig.add_trace(go.Heatmap(
            z=lg.to_numpy(dtype=float), x=list(m.columns), y=list(m.index),
            customdata=m.to_numpy(dtype=float), zmin=zmin, zmax=zmax, colorscale="Viridis",
            showscale=i == len(mats), colorbar=dict(title="log10"),
            hovertemplate="%{y} %{x}<br>" + name + " %{customdata:.3e}<extra></extra>"),
            row=1, col=i)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(template=TEMPLATE, height=max(300, 40 * len(mats[0][1]) + 140))
    return fig


def error_reduction(stats: pd.DataFrame, before: str, after: str) -> go.Figure:
    """Heatmap of ``after / before`` per layer and module (below 1: the method helped)."""
    b, a = _matrix(stats, before), _matrix(stats, after)
    if b.empty or a.empty:
        return _empty(f"needs both {before} and {after}")
    ratio = (a / b.where(b > 0)).reindex(index=b.index, columns=b.columns)
    fig = go.Figure(go.Heatmap(z=ratio.to_numpy(dtype=float), x=list(ratio.columns),
                               y=list(ratio.index), colorscale="RdYlGn_r", zmid=1.0,
                               colorbar=dict(title="after/before"),
                               hovertemplate="%{y} %{x}<br>ratio %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(template=TEMPLATE, title=f"{after} / {before}",
                      height=max(300, 40 * len(ratio) + 140))
    return fig


def timings_bar(timings: dict[str, float]) -> go.Figure:
    """Seconds per stage of one run (``time_<stage>_s`` metrics)."""
    items = [(k, v) for k, v in timings.items() if v is not None]
    if not items:
        return _empty("no timings stored")
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h",
                           hovertemplate="%{y}: %{x:.2f} s<extra></extra>"))
    fig.update_layout(template=TEMPLATE, height=80 + 40 * len(items), xaxis_title="seconds",
                      margin=dict(t=20))
    return fig


def _palette(keys) -> dict[str, str]:
    colors = pc.qualitative.Plotly + pc.qualitative.D3
    return {str(k): colors[i % len(colors)] for i, k in enumerate(keys)}
