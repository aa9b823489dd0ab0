"""Streamlit dashboard over the results database (read-only).

Start it with ``harness dashboard [--db URL]``, which binds 127.0.0.1 (or ``streamlit run
dashboard/app.py --server.address 127.0.0.1 -- --db URL``: plain ``streamlit run`` listens on
every interface; without ``--db`` the URL comes from ``LOWBIT_DB``, then ``HARNESS_DB``, then
the default).
Pages: Leaderboard, Compare, Training, Layers, Run detail; ``?page=detail&run=KEY`` links
straight to one run. Queries are cached per database version (file mtime for SQLite).
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
from pathlib import Path

try:
    import dashboard  # noqa: F401  (installed package)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import streamlit as st

from dashboard import charts, queries
from dashboard.launch import db_url_from_argv
from harness.errors import HarnessError
from harness.report import fmt_num
from harness.store import DEFAULT_DB, Store

PAGES = {"leaderboard": "Leaderboard", "compare": "Compare", "training": "Training",
         "layers": "Layers", "detail": "Run detail"}
FIRST_RUN = "harness run --methods rtn --bits 3"
# Leaderboard columns: source column -> header.
BOARD = {"status": "status", "model": "model", "method": "method", "fmt": "fmt", "bits": "bits",
         "group_size": "group", "seeds": "seeds", "ppl": "PPL", "ppl_rank": "PPL rank",
         "ppl_fp": "PPL/FP"}
BOARD_TAIL = {"acc_avg": "acc avg", "acc_rank": "acc rank", "size_mb": "size MB",
              "bits_per_weight": "bits/weight", "wall_s": "wall s"}
# Columns shown with their uncertainty (text: "31.10 ± 0.46 (n=3)", "31.00 [30.20, 31.90]"),
# and their digits (2 unless named; per-task accuracy 3).
UNCERTAIN = ("ppl", "ppl_fp", "acc_avg")
DIGITS = {"ppl_fp": 3, "acc_avg": 3}
INTERVAL_NOTE = ("[low, high]: 95% interval of one run (PPL: bootstrap over the evaluation "
                 "windows; accuracy: ± 1.96 × lm-eval's standard error)")
NUMBERS_NOTE = (INTERVAL_NOTE + "; mean ± std (n=k): k seeds of one spec, std with ddof=1; a "
                "bare number: stored without an interval. PPL/FP's interval is the run's PPL "
                "interval over the FP run's PPL (the FP run's own uncertainty is not included).")
RANK_NOTE = ("Rank: among quantized runs of one model and evaluation protocol (PPL: window "
             f"and token cap; accuracy: tasks, limit, shots). \"{queries.WITHIN_NOISE}\": its "
             "interval overlaps the best one's, so the order between them is not resolved; a "
             "seed group's interval is its mean ± the wider of the std across seeds and its "
             "runs' mean 95% interval. A run stored without an interval keeps a strict rank. "
             "Overlapping unpaired intervals are a conservative rule: two runs scored on the "
             "same windows can still differ significantly when paired, which `harness compare "
             "RUN_A RUN_B` tests.")
WHISKERS_NOTE = ("Whiskers: 95% intervals (PPL: bootstrap over the evaluation windows; "
                 "accuracy: ± 1.96 × lm-eval's standard error; PPL/FP: the run's PPL interval "
                 "over the FP run's PPL, the FP run's own uncertainty not included). A seed "
                 "group (n > 1) shows its mean, whiskered by the wider of the std across seeds "
                 "(ddof=1) and its runs' mean 95% interval. No whisker: no interval stored.")


# --- cached data access (keyed on the database version) ----------------------------------
@st.cache_resource(show_spinner=False)
def get_store(url: str) -> Store:
    return Store(url, readonly=True)


@st.cache_data(show_spinner=False)
def load_board(url: str, version: str) -> pd.DataFrame:
    return queries.leaderboard(get_store(url))


@st.cache_data(show_spinner=False)
def load_tasks(url: str, version: str, run_ids: tuple[int, ...]) -> pd.DataFrame:
    return queries.task_scores(get_store(url), list(run_ids))


@st.cache_data(show_spinner=False)
def load_steps(url: str, version: str, run_ids: tuple[int, ...]) -> pd.DataFrame:
    return queries.train_steps(get_store(url), list(run_ids))


@st.cache_data(show_spinner=False)
def load_runs_with(url: str, version: str, table: str) -> list[int]:
    return queries.runs_with(get_store(url), table)


@st.cache_data(show_spinner=False)
def load_layers(url: str, version: str, run_id: int) -> pd.DataFrame:
    return queries.layer_stats(get_store(url), [run_id])


@st.cache_data(show_spinner=False)
def load_detail(url: str, version: str, ref: str) -> dict:
    return queries.run_detail(get_store(url), ref)


# --- helpers ---------------------------------------------------------------------------
def _stretch(fn, *args, **kwargs):
    """Full-width element on old (use_container_width) and new (width="stretch") Streamlit."""
    params = inspect.signature(fn).parameters
    if "width" in params and isinstance(params["width"].default, str):
        kwargs.setdefault("width", "stretch")
    else:
        kwargs.setdefault("use_container_width", True)
    return fn(*args, **kwargs)


def chart(fig, key: str | None = None) -> None:
    _stretch(st.plotly_chart, fig, key=key)


def open_detail(run_key: str) -> None:
    st.session_state["page"] = "detail"
    st.session_state["detail_run"] = run_key
    st.session_state.pop("detail_pick", None)


def run_choices(board: pd.DataFrame, ids=None) -> dict[str, int]:
    """``{label: run id}`` for select boxes, newest last."""
    df = board if ids is None else board[board["id"].isin(list(ids))]
    return dict(zip(df["label"], df["id"], strict=True))


def ranked(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with ``ppl_rank`` and ``acc_rank`` (:func:`queries.rank_column`)."""
    return rows.assign(ppl_rank=queries.rank_column(rows, "ppl"),
                       acc_rank=queries.rank_column(rows, "acc_avg", higher_is_better=True))


def protocol_name(row) -> str:
    """``model, windows of 256, first 2,048 tokens``: the PPL protocol a ranking is within."""
    cap, window = queries._none(row["eval_max_tokens"]), queries._none(row["eval_seq_len"])
    parts = [str(row["model"])] + ([f"windows of {int(window)}"] if window is not None else [])
    parts.append("all held-out tokens" if cap is None else f"first {int(cap):,} tokens")
    return ", ".join(parts)


def noise_summary(rows: pd.DataFrame, metric: str, rank: str, what: str) -> list[str]:
    """One line per protocol: the best run and the runs within noise of it."""
    lines = []
    best = rows[rows[rank] == queries.BEST]
    for idx, b in best.iterrows():
        if metric.startswith("acc"):
            same = rows["acc_protocol"] == b["acc_protocol"]
            where = str(b["model"]) + " (same tasks)"
        else:
            ref = queries._protocols(rows.loc[[idx]])[0]
            same = pd.Series([p == ref for p in queries._protocols(rows)], index=rows.index)
            where = protocol_name(b)
        near = rows[same & (rows[rank] == queries.WITHIN_NOISE)]
        value = queries.uncertain_column(rows.loc[[idx]], metric,
                                         DIGITS.get(metric, 2)).iloc[0]
        line = f"**{where}** — best {what}: {b['label']}, {value}; "
        line += (f"{queries.WITHIN_NOISE}: " + ", ".join(near["label"]) if len(near)
                 else "every other run is outside its interval")
        lines.append(line)
    return lines


def evaluation_line(metrics: pd.DataFrame) -> str:
    """``PPL 31.00 [30.30, 31.90] · acc avg ...`` of one run's metrics (``run_detail``)."""
    values = {n: v for t, n, v in zip(metrics["task"], metrics["name"], metrics["value"],
                                      strict=True) if not t}
    if not values:
        return ""
    one = queries.with_intervals(pd.DataFrame([values]))
    parts = []
    for col in [*queries.ppl_columns(one), "acc_avg"]:
        if col in one.columns and pd.notna(one[col].iloc[0]):
            name = {"acc_avg": "acc avg", "ppl": "PPL"}.get(col, "PPL " + col[len("ppl_"):])
            text = queries.uncertain_column(one, col, DIGITS.get(col, 2)).iloc[0]
            parts.append(f"**{name}** {text}")
    return " · ".join(parts)


def replicates_of(board: pd.DataFrame, run_key: str) -> list[tuple[int, str]]:
    """``(seed, run key)`` of the other runs of this run's spec, by seed."""
    if "replicate_key" not in board.columns:
        return []
    me = board[board["run_key"] == run_key]
    if me.empty or me["replicate_key"].iloc[0] is None:
        return []
    same = board[(board["replicate_key"] == me["replicate_key"].iloc[0])
                 & (board["run_key"] != run_key)]
    return sorted((int(s), k) for s, k in zip(same["seed"], same["run_key"], strict=True))


def fmt_value(v, digits: int = 2) -> str:
    return fmt_num(float(v) if v is not None and not isinstance(v, str) else v, digits)


# --- pages -------------------------------------------------------------------------------
def with_db(cmd: str, url: str) -> str:
    """``cmd`` plus ``--db URL`` unless it is the default, quoted for the shell."""
    return cmd if url == DEFAULT_DB else f"{cmd} --db {shlex.quote(url)}"


def page_empty(url: str) -> None:
    st.title("lowbit-harness dashboard")
    st.info("The database has no runs yet. Quantize and evaluate something first:")
    st.code(with_db(FIRST_RUN, url), language="bash")
    st.caption(f"Reading {url} (read-only).")
    if st.button("Refresh"):  # the next run reads the database again (its version changed)
        st.rerun()


def page_leaderboard(url: str, board: pd.DataFrame) -> None:
    st.title("Leaderboard")
    cols = st.columns(4)
    filters = {}
    for col, (field, name) in zip(cols, [("model", "Model"), ("method", "Method"),
                                         ("bits", "Bits"), ("status", "Status")], strict=True):
        # bits: NaN for fp runs makes the column float; the choices are whole numbers
        values = board[field].dropna()
        options = sorted({int(v) if field == "bits" else v for v in values}, key=str)
        filters[field] = col.multiselect(name, options, key=f"filter_{field}")
    df = board
    for field, chosen in filters.items():
        if chosen:
            df = df[df[field].isin(chosen)]
    by_spec = st.toggle("Group seeds of one spec (mean ± std)", value=True, key="board_group",
                        help="runs whose specs differ only in the seed")
    rows = ranked(queries.group_replicates(df, by_spec=by_spec))
    rows = rows.sort_values(["ppl_fp", "ppl"], na_position="last")
    tasks = queries.tasks_of(board)
    task_cols = {}
    for t in tasks:
        c = queries._task_acc_column(board, t)
        if c:
            task_cols[c] = t
    more_ppl = {c: "PPL " + c[len("ppl_"):] for c in queries.ppl_columns(board) if c != "ppl"}
    view = pd.DataFrame({"run": [f"?page=detail&run={k}" for k in rows["run_key"]]},
                        index=rows.index)
    for src, name in {**BOARD, **more_ppl, **task_cols, **BOARD_TAIL}.items():
        if src in UNCERTAIN or src in more_ppl or src in task_cols:
            view[name] = queries.uncertain_column(rows, src, DIGITS.get(src, 3 if src in
                                                                        task_cols else 2))
        elif src == "seeds":
            view[name] = [", ".join(str(x) for x in v) for v in rows["seeds"]]
        else:
            view[name] = rows[src] if src in rows.columns else pd.NA
    config = {
        "run": st.column_config.LinkColumn("run", display_text=r"run=(\w+)",
                                           help="open the run detail (a seed group: its first "
                                                "run; every run is in the picker below)"),
        "seeds": st.column_config.TextColumn(help="seeds of the runs in this row"),
        "PPL": st.column_config.TextColumn(help="perplexity with its uncertainty"),
        "PPL rank": st.column_config.TextColumn(help=RANK_NOTE),
        "PPL/FP": st.column_config.TextColumn(help="PPL over the fp run's"),
        "acc avg": st.column_config.TextColumn(help="average task accuracy"),
        "acc rank": st.column_config.TextColumn(help=RANK_NOTE),
        "size MB": st.column_config.NumberColumn(format="%.2f"),
        "bits/weight": st.column_config.NumberColumn(format="%.3f"),
        "wall s": st.column_config.NumberColumn(format="%.0f"),
    }
    for t in task_cols.values():
        config[t] = st.column_config.TextColumn(help=f"{t} accuracy")
    st.dataframe(view, hide_index=True, column_config=config, key="board")
    failed = int((df["status"] == "failed").sum())
    groups = int((rows["n"] > 1).sum()) if len(rows) else 0
    st.caption(f"{len(df)} of {len(board)} runs"
               + (f" in {len(rows)} rows ({groups} seed group{'s' * (groups > 1)})"
                  if groups else "")
               + " · sorted by PPL/FP" + (f" · {failed} failed (open the run for its error)"
                                          if failed else ""))
    st.caption(NUMBERS_NOTE + " " + RANK_NOTE)
    left, right = st.columns([3, 1])
    labels = dict(zip(df["label"], df["run_key"], strict=True))
    if labels:
        pick = left.selectbox("Run", list(labels), key="board_pick", label_visibility="collapsed")
        right.button("Open run detail", on_click=open_detail, args=(labels[pick],))
    st.download_button("Download CSV", df.drop(columns=["error"]).to_csv(index=False),
                       file_name="leaderboard.csv", mime="text/csv")


def page_compare(url: str, board: pd.DataFrame, version: str) -> None:
    st.title("Compare")
    done = board[board["status"] == "finished"]
    if done.empty:
        st.info("No finished runs to compare yet.")
        return
    choices = run_choices(done)
    # the newest twelve: the runs just made are the ones a user comes to compare
    picked = st.multiselect("Runs", list(choices), default=list(choices)[-12:], key="cmp_runs")
    sel = done[done["id"].isin([choices[p] for p in picked])]
    by_spec = st.toggle("Group seeds of one spec (mean ± std)", value=True, key="cmp_group",
                        help="runs whose specs differ only in the seed: one bar, one point")
    rows = ranked(queries.group_replicates(sel, by_spec=by_spec))
    numeric = [c for c in ["ppl", "ppl_fp", "size_mb", "bits_per_weight", "acc_avg",
                           "compression_vs_fp16", "wall_s", *queries.ppl_columns(board)[1:],
                           *queries.task_columns(board)]
               if c in rows.columns and rows[c].notna().any()]
    default = [c for c in ("ppl", "ppl_fp", "size_mb", "acc_avg") if c in numeric]
    metrics = st.multiselect("Metrics", numeric, default=default, key="cmp_metrics",
                             format_func=charts.title_of)
    chart(charts.metric_bars(rows, metrics), key="cmp_bars")
    st.caption(WHISKERS_NOTE)
    st.subheader("Perplexity vs size")
    x = st.radio("x axis", ["size_mb", "bits_per_weight"], horizontal=True, key="cmp_x",
                 format_func=charts.title_of)
    chart(charts.pareto_scatter(rows, x=x, y="ppl"), key="cmp_pareto")
    contest = rows[(rows["ppl_rank"] != "") | (rows["acc_rank"] != "")]
    if not contest.empty:
        st.subheader("Ranking within noise, per model and evaluation protocol")
        for line in (noise_summary(rows, "ppl", "ppl_rank", "PPL")
                     + noise_summary(rows, "acc_avg", "acc_rank", "accuracy")):
            st.markdown("- " + line)
        table = pd.DataFrame({
            "model": contest["model"], "run": contest["label"],
            "PPL": queries.uncertain_column(contest, "ppl"),
            "PPL/FP": queries.uncertain_column(contest, "ppl_fp", 3),
            "PPL rank": contest["ppl_rank"],
            "acc avg": queries.uncertain_column(contest, "acc_avg", 3),
            "acc rank": contest["acc_rank"]})
        _stretch(st.dataframe, table.loc[contest.sort_values(["ppl_fp", "ppl"]).index],
                 hide_index=True, key="cmp_ranks")
        st.caption(NUMBERS_NOTE + " " + RANK_NOTE)
    st.subheader("Accuracy per task")
    scores = load_tasks(url, version, tuple(int(i) for i in sel["id"]))
    if scores.empty:
        st.caption("No task accuracy stored; add `--tasks arc_easy,piqa` to `harness run`.")
    else:
        chart(charts.accuracy_bars(queries.group_scores(scores, rows)), key="cmp_acc")
        st.caption("Whiskers: ± 1.96 × lm-eval's standard error (a seed group: the wider of "
                   "that and the std across seeds); no whisker: no standard error stored.")


def page_training(url: str, board: pd.DataFrame, version: str) -> None:
    st.title("Training")
    ids = load_runs_with(url, version, "train_steps")
    if not ids:
        st.info("No training steps logged yet; qat, bitdistiller and onebit runs log them.")
        return
    choices = run_choices(board, ids)
    picked = st.multiselect("Runs", list(choices), default=list(choices)[-6:], key="train_runs")
    steps = load_steps(url, version, tuple(int(choices[p]) for p in picked))
    chart(charts.training_curves(steps), key="train_curves")
    if not steps.empty:
        last = steps.sort_values("step").groupby("label").tail(1)
        _stretch(st.dataframe, last[["label", "step", "loss", "lr", "tokens_per_s"]],
                 hide_index=True)


def page_layers(url: str, board: pd.DataFrame, version: str) -> None:
    st.title("Layers")
    ids = load_runs_with(url, version, "layer_stats")
    if not ids:
        st.info("No per-layer stats stored yet; clip, qat, bitdistiller and onebit runs "
                "record quantization error per layer.")
        return
    choices = run_choices(board, ids)
    pick = st.selectbox("Run", list(choices), key="layers_run")
    stats = load_layers(url, version, int(choices[pick]))
    present = list(dict.fromkeys(stats["stat"]))
    shown = st.multiselect("Stats", present, key=f"layers_stats_{choices[pick]}",
                           default=next(([a, b] for a, b in charts.STAT_PAIRS
                                         if a in present and b in present), present))
    st.caption("Colour: log10 of the error, one scale for all panels; rows are decoder layers.")
    chart(charts.layer_heatmap(stats, shown or None), key="layers_heat")
    for before, after in charts.STAT_PAIRS:
        if before in present and after in present:
            chart(charts.error_reduction(stats, before, after), key=f"layers_ratio_{after}")
    summary = stats.pivot_table(index="module", columns="stat", values="value", aggfunc="mean")
    _stretch(st.dataframe, summary)


def page_detail(url: str, board: pd.DataFrame, version: str) -> None:
    st.title("Run detail")
    keys = dict(zip(board["label"], board["run_key"], strict=True))
    wanted = st.session_state.get("detail_run") or st.query_params.get("run")
    labels = list(keys)
    index = next((i for i, lab in enumerate(labels) if wanted and keys[lab].startswith(wanted)),
                 None)
    if index is None:
        if wanted:
            st.warning(f"No run {wanted!r} in this database; showing the latest run.")
        index = len(labels) - 1
    if "detail_pick" in st.session_state and st.session_state["detail_pick"] not in keys:
        del st.session_state["detail_pick"]
    pick = st.selectbox("Run", labels, index=index, key="detail_pick")
    st.session_state["detail_run"] = keys[pick]
    st.query_params["run"] = keys[pick]
    try:
        d = load_detail(url, version, keys[pick])
    except HarnessError as exc:
        st.warning(str(exc))
        return
    run = d["run"]
    st.subheader(run["label"])
    cols = st.columns(4)
    cols[0].metric("status", run["status"])
    cols[1].metric("model", str(run["model"]).split("/")[-1])
    cols[2].metric("wall s", fmt_value(run["wall_s"], 1))
    cols[3].metric("attempts", str(run["attempts"]))
    if run["status"] == "failed":
        st.error("This run failed:")
        st.code(run["error"] or "(no error text stored)", language="text")
    elif run["status"] == "running":
        st.info("This run is still running (or was interrupted); rerun `harness run` to resume.")
    elif run["status"] == "pending":
        st.info("This run is planned but has not started; `harness run` runs it.")
    mem = d["memory"]
    if mem:
        st.subheader("Memory")
        mcols = st.columns(4)
        for col, name in zip(mcols, ["size_mb", "bits_per_weight", "compression_vs_fp16",
                                     "peak_rss_mb"], strict=True):
            if name in mem:
                col.metric(charts.title_of(name),
                           fmt_value(mem[name], 3 if name == "bits_per_weight" else 2))
    evaluation = evaluation_line(d["metrics"])
    if evaluation:
        st.markdown(evaluation)
        st.caption(INTERVAL_NOTE + "; a bare number: stored without an interval.")
    siblings = replicates_of(board, run["run_key"])
    if siblings:
        st.markdown("Replicates of this spec (other seeds): " + " · ".join(
            f"[seed {seed}: {key}](?page=detail&run={key})" for seed, key in siblings))
    left, right = st.columns(2)
    with left:
        st.subheader("Metrics")
        m = d["metrics"].drop(columns=["extra"])
        if m.empty:
            st.caption("No metrics stored.")
        else:
            _stretch(st.dataframe, m, hide_index=True)
    with right:
        st.subheader("Timings")
        chart(charts.timings_bar(d["timings"]), key="detail_timings")
    if run["status"] == "finished" and run["method"] != queries.FP_METHOD:
        st.subheader("Export")
        cmd = f"harness export {run['run_key']} exports/{run['run_key']} --packed"
        st.code(with_db(cmd, url), language="bash")
    if d["artifacts"]:
        st.caption("Artifacts: " + ", ".join(f"{k}: `{v}`" for k, v in d["artifacts"].items()))
    if not d["train"].empty:
        st.subheader("Training")
        chart(charts.training_curves(d["train"]), key="detail_train")
    if not d["layers"].empty:
        st.subheader("Per-layer error")
        chart(charts.layer_heatmap(d["layers"]), key="detail_layers")
    st.subheader("Spec")
    # two levels open where Streamlit takes a depth (>= 1.40), else collapsed
    depth = 2 if "int" in str(inspect.signature(st.json).parameters["expanded"].annotation) \
        else False
    st.json(run["spec"] or {}, expanded=depth)
    with st.expander("Environment"):
        st.json({"host": run["host"], "device": run["device"], "started_at": str(run["started_at"]),
                 "finished_at": str(run["finished_at"]), "spec_hash": run["spec_hash"],
                 "versions": run["versions"]}, expanded=True)
    with st.expander("Metric details (extra)"):
        extra = {f"{t}/{n}" if t else n: e for t, n, e in
                 zip(d["metrics"]["task"], d["metrics"]["name"], d["metrics"]["extra"],
                     strict=True) if e}
        st.code(json.dumps(extra, indent=1, default=str), language="json")


# --- entry -------------------------------------------------------------------------------
def main() -> None:
    st.set_page_config(page_title="lowbit-harness", page_icon="📉", layout="wide")
    url = db_url_from_argv()
    try:
        store = get_store(url)
        version = queries.data_version(store)
        board = load_board(url, version)
    except HarnessError as exc:
        st.error(str(exc))
        st.code(FIRST_RUN, language="bash")
        return
    if board.empty:
        page_empty(url)
        return
    if "page" not in st.session_state:
        wanted = st.query_params.get("page", "leaderboard")
        st.session_state["page"] = wanted if wanted in PAGES else "leaderboard"
    with st.sidebar:
        st.header("lowbit-harness")
        page = st.radio("Page", list(PAGES), format_func=PAGES.get, key="page")
        st.caption(f"{len(board)} runs · {url} (read-only)")
        if st.button("Refresh"):
            st.cache_data.clear()
    st.query_params["page"] = page
    if page != "detail" and "run" in st.query_params:
        del st.query_params["run"]
    render = {"leaderboard": lambda: page_leaderboard(url, board),
              "compare": lambda: page_compare(url, board, version),
              "training": lambda: page_training(url, board, version),
              "layers": lambda: page_layers(url, board, version),
              "detail": lambda: page_detail(url, board, version)}[page]
    try:
        render()
    except Exception as exc:  # one bad row must not blank the whole dashboard
        st.warning(f"This page could not be drawn ({type(exc).__name__}: {exc}). "
                   f"Other pages still work; please report this with `harness show`.")


main()
