"""dashboard/queries.py over the fake database (read-only)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dashboard import queries
from harness.errors import HarnessError
from harness.store import Store


def test_runs_table_pivots_metrics_and_keeps_failed_runs(ro_store, fake_db):
    _, ids = fake_db
    df = queries.runs_table(ro_store)
    assert len(df) == len(ids)
    assert {"ppl", "size_mb", "bits_per_weight", "arc_easy/acc", "piqa/acc_norm"} <= set(df.columns)
    failed = df.set_index("id").loc[ids["failed"]]
    assert failed["status"] == "failed" and math.isnan(failed["ppl"])
    assert "loss became nan" in failed["error"]


def test_leaderboard_ratio_and_average(ro_store, fake_db):
    _, ids = fake_db
    df = queries.leaderboard(ro_store).set_index("id")
    assert df.loc[ids["fp"], "ppl_fp"] == pytest.approx(1.0)
    assert df.loc[ids["rtn"], "ppl_fp"] == pytest.approx(4500 / 20)
    assert df.loc[ids["qat"], "acc_avg"] == pytest.approx((0.50 + 0.61) / 2)  # stored acc_avg
    assert math.isnan(df.loc[ids["clip"], "acc_avg"])  # no tasks, no average
    assert df.loc[ids["rtn"], "label"].startswith("rtn int2 g128 · ")


def test_leaderboard_averages_tasks_when_acc_avg_absent(tmp_path):
    from tests.dashboard.conftest import _add_run

    url = f"sqlite:///{tmp_path / 'a.db'}"
    store = Store(url)
    rid = _add_run(store, "rtn", 3)
    store.add_metric(rid, "acc", 0.4, task="arc_easy")
    store.add_metric(rid, "acc", 0.6, task="piqa")
    df = queries.leaderboard(Store(url, readonly=True))
    assert df.loc[0, "acc_avg"] == pytest.approx(0.5)
    assert math.isnan(df.loc[0, "ppl_fp"])  # no fp run


def test_fp_ratio_per_model(ro_store, fake_db):
    df = queries.fp_ratio(ro_store)
    assert set(df["method"]) == {"rtn", "clip", "qat", "bitdistiller", "onebit"}
    assert (df["fp_ppl"] == 20.0).all()
    assert df["ppl_fp"].min() == pytest.approx(31 / 20)


def test_task_scores_and_columns_use_acc_the_metric_acc_avg_averages(ro_store, fake_db):
    """The harness averages each task's ``acc`` into acc_avg; a task column showing acc_norm
    beside it did not add up (FP on SmolLM2: nextline acc_norm 0.56 beside acc avg 0.29)."""
    _, ids = fake_db
    df = queries.task_scores(ro_store, [ids["rtn"]])
    assert set(df["task"]) == {"arc_easy", "piqa"}
    assert set(df["metric"]) == {"acc"}
    assert df.set_index("task").loc["arc_easy", "value"] == pytest.approx(0.26)
    board = queries.leaderboard(ro_store).set_index("id")
    cols = [queries._task_acc_column(board, t) for t in queries.tasks_of(board)]
    assert cols == ["arc_easy/acc", "piqa/acc"]
    assert board.loc[ids["qat"], cols].mean() == pytest.approx(board.loc[ids["qat"], "acc_avg"])


def _run_with_eval(store, method, ppl, seq_len, max_tokens, key):
    """A run whose spec carries its evaluation protocol, as harness run stores it."""
    from harness.store import Run

    spec = {"method": method, "model": "tiny-llama", "profile": "quick", "seed": 0,
            "eval": {"seq_len": seq_len, "max_tokens": max_tokens, "tasks": [], "limit": None}}
    with store.session() as s, s.begin():
        run = Run(run_key=key[:12], spec_hash=key, method=method, model="tiny-llama",
                  profile="quick", seed=0, spec=spec, status="finished")
        s.add(run)
        s.flush()
        rid = run.id
    store.add_metric(rid, "ppl", ppl)
    return rid


def test_ppl_ratio_divides_by_the_fp_run_of_the_same_window_and_cap(tmp_path):
    """Keyed on model and profile, every ratio moved when an FP run of another window or
    token cap was stored (the earlier FP run itself read 0.973); now each run takes the FP of
    its own protocol, and one without such an FP shows none rather than a wrong one."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = Store(url)
    fp_a = _run_with_eval(store, "fp", 20.0, 256, 2048, "a" * 64)
    rtn_a = _run_with_eval(store, "rtn", 30.0, 256, 2048, "b" * 64)
    fp_b = _run_with_eval(store, "fp", 25.0, 128, 256, "c" * 64)  # stored later: used to win
    rtn_b = _run_with_eval(store, "rtn", 50.0, 128, 256, "d" * 64)
    rtn_c = _run_with_eval(store, "rtn", 40.0, 256, None, "e" * 64)  # all tokens: no FP yet
    df = queries.leaderboard(Store(url, readonly=True)).set_index("id")
    assert df.loc[fp_a, "ppl_fp"] == pytest.approx(1.0)
    assert df.loc[fp_b, "ppl_fp"] == pytest.approx(1.0)
    assert df.loc[rtn_a, "ppl_fp"] == pytest.approx(30 / 20)
    assert df.loc[rtn_b, "ppl_fp"] == pytest.approx(50 / 25)
    assert math.isnan(df.loc[rtn_c, "ppl_fp"])


@pytest.mark.parametrize("fmt,bits,group,expected", [
    ("int", 2, 128, "rtn int2 g128"), ("nf3", 3, 64, "rtn nf3 g64"),
    ("binary", 1, None, "rtn binary"), (None, None, None, "rtn")])
def test_run_labels_name_each_width_once(fmt, bits, group, expected):
    assert queries.run_label("rtn", fmt, bits, group, "abcdef123456") == expected + " · abcdef"


def test_task_scores_of_a_failed_run_are_empty(ro_store, fake_db):
    _, ids = fake_db
    assert queries.task_scores(ro_store, [ids["failed"]]).empty


def test_train_steps_and_layer_stats(ro_store, fake_db):
    _, ids = fake_db
    steps = queries.train_steps(ro_store, [ids["qat"], ids["bitdistiller"], ids["failed"]])
    assert list(steps.columns) == queries.TRAIN_COLUMNS
    assert steps.groupby("run_id").size().to_dict() == {ids["qat"]: 20, ids["bitdistiller"]: 20}
    assert queries.train_steps(ro_store, []).empty
    assert set(queries.runs_with(ro_store, "train_steps")) == {ids["qat"], ids["bitdistiller"],
                                                               ids["onebit"]}
    stats = queries.layer_stats(ro_store, [ids["clip"]])
    assert set(stats["stat"]) == {"rtn_output_mse", "clip_output_mse"}
    assert list(stats["layer"].unique()) == ["layers.0", "layers.1"]
    assert queries.layer_stats(ro_store, [ids["failed"]]).empty


def test_layer_sort_key_orders_numerically():
    assert sorted(["layers.10", "layers.2", "layers.1"], key=queries.layer_sort_key) == [
        "layers.1", "layers.2", "layers.10"]


def test_run_detail(ro_store, fake_db):
    _, ids = fake_db
    d = queries.run_detail(ro_store, ids["qat"])
    assert d["timings"] == {"load": 1.5, "prepare": 3.0, "eval": 4.0}
    assert d["memory"]["size_mb"] == 80.0
    assert len(d["train"]) == 20 and not d["layers"].empty
    assert d["run"]["spec"]["method"] == "qat"
    failed = queries.run_detail(ro_store, ids["failed"])
    assert failed["metrics"].empty and failed["timings"] == {} and failed["memory"] == {}
    assert "TrainingDiverged" in failed["run"]["error"]
    with pytest.raises(HarnessError):
        queries.run_detail(ro_store, "zzzz")


def test_empty_database_gives_empty_frames(empty_db):
    store = Store(empty_db, readonly=True)
    assert queries.leaderboard(store).empty
    assert queries.fp_ratio(store).empty
    assert queries.task_scores(store).empty
    assert queries.layer_stats(store).empty
    assert queries.runs_with(store, "layer_stats") == []


def test_schemaless_database(tmp_path):
    import sqlite3

    path = tmp_path / "blank.db"
    sqlite3.connect(path).close()
    store = Store(f"sqlite:///{path}", readonly=True)
    assert not queries.has_schema(store)
    assert queries.leaderboard(store).empty
    assert queries.train_steps(store, [1]).empty


def test_data_version_changes_with_writes(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    from tests.dashboard.conftest import _add_run

    store = Store(url)
    before = queries.data_version(store)
    _add_run(store, "rtn", 3)
    assert queries.data_version(store) != before


def test_sqlite_path():
    assert str(queries.sqlite_path("sqlite:///runs/x.db")) == "runs/x.db"
    assert queries.sqlite_path("sqlite://") is None
    assert queries.sqlite_path("postgresql+psycopg://u@h/db") is None


def test_frames_are_pandas(ro_store):
    assert isinstance(queries.leaderboard(ro_store), pd.DataFrame)


# --- uncertainty: intervals, replicate groups, the within-noise rule --------------------------
from tests.dashboard.conftest import NOISE_PPL, NOISE_SE  # noqa: E402

AVG_SE = math.sqrt(2 * NOISE_SE ** 2) / 2


@pytest.fixture
def noise_store(noise_db) -> Store:
    return Store(noise_db[0], readonly=True)


def test_replicate_key_ignores_the_seed_and_nothing_else():
    spec = {"method": "qat", "model": "m", "seed": 0, "config": {"bits": 3},
            "eval": {"seq_len": 256}}
    assert queries.replicate_key(spec) == queries.replicate_key({**spec, "seed": 7})
    assert queries.replicate_key(spec) != queries.replicate_key({**spec, "config": {"bits": 2}})
    assert queries.replicate_key(spec) != queries.replicate_key({**spec, "method": "rtn"})
    assert queries.replicate_key(None) is None and queries.replicate_key({}) is None


def test_summarize_std_is_sample_std_and_whiskers_take_the_wider_side():
    vals = [31.0, 31.6, 30.7]
    std1 = math.sqrt(sum((v - 31.1) ** 2 for v in vals) / 2)  # ddof=1: 0.458, ddof=0: 0.374
    # members' intervals wider than the std: mean minus 0.7 / plus 0.9 (their half-widths)
    s = queries.summarize(vals, [v - 0.7 for v in vals], [v + 0.9 for v in vals])
    assert s["value"] == pytest.approx(31.1) and s["n"] == 3
    assert s["std"] == pytest.approx(std1)
    assert (s["lo"], s["hi"]) == (pytest.approx(31.1 - 0.7), pytest.approx(31.1 + 0.9))
    # narrow member intervals: the std across seeds is the wider, on both sides
    s = queries.summarize(vals, [v - 0.1 for v in vals], [v + 0.1 for v in vals])
    assert (s["lo"], s["hi"]) == (pytest.approx(31.1 - std1), pytest.approx(31.1 + std1))
    # replicates stored without intervals: mean ± std
    s = queries.summarize(vals)
    assert (s["lo"], s["hi"]) == (pytest.approx(31.1 - std1), pytest.approx(31.1 + std1))
    # one value keeps its own interval (or none); no value: nothing
    s = queries.summarize([20.0, math.nan], [19.6, math.nan], [20.5, math.nan])
    assert (s["value"], s["n"], s["lo"], s["hi"]) == (20.0, 1, 19.6, 20.5)
    assert math.isnan(s["std"])
    assert math.isnan(queries.summarize([30.0])["lo"])
    assert queries.summarize([math.nan])["n"] == 0


def test_group_replicates_of_the_noise_db(noise_store, noise_db):
    _, ids = noise_db
    board = queries.leaderboard(noise_store)
    rows = queries.group_replicates(board)
    assert len(rows) == len(ids) - 2  # three qat seeds, one row
    qat = rows[rows["method"] == "qat"].iloc[0]
    assert qat["n"] == 3 and qat["seeds"] == [0, 1, 2]
    assert qat["run_ids"] == [ids["qat0"], ids["qat1"], ids["qat2"]]
    assert qat["run_key"] == board.set_index("id").loc[ids["qat0"], "run_key"]
    assert "(3 seeds)" in qat["label"]
    assert qat["ppl"] == pytest.approx(31.1) and qat["ppl_n"] == 3
    assert qat["ppl_std"] == pytest.approx(math.sqrt((0.1 ** 2 + 0.5 ** 2 + 0.4 ** 2) / 2))
    assert (qat["ppl_lo"], qat["ppl_hi"]) == (pytest.approx(30.4), pytest.approx(32.0))
    assert qat["ppl_fp"] == pytest.approx(31.1 / 20)
    assert qat["ppl_fp_lo"] == pytest.approx(30.4 / 20)  # the ratio's interval follows
    single = rows[rows["method"] == "bitdistiller"].iloc[0]
    assert single["n"] == 1 and "seeds)" not in single["label"]
    assert (single["ppl"], single["ppl_lo"], single["ppl_hi"]) == NOISE_PPL["bitdistiller"]
    assert math.isnan(single["ppl_std"])
    rtn = rows[rows["method"] == "rtn"].iloc[0]
    assert math.isnan(rtn["ppl_lo"]) and math.isnan(rtn["ppl_hi"])  # stored without one
    assert len(queries.group_replicates(board, by_spec=False)) == len(ids)


def test_only_finished_runs_form_groups(tmp_path):
    from tests.dashboard.conftest import _add_run

    url = f"sqlite:///{tmp_path / 'g.db'}"
    store = Store(url)
    a = _add_run(store, "qat", 3, seed=0)
    b = _add_run(store, "qat", 3, seed=1, minutes=1)
    c = _add_run(store, "qat", 3, seed=2, minutes=2, status="failed", error="boom")
    d = _add_run(store, "qat", 2, seed=1, minutes=3)  # another spec: not a replicate
    for rid, ppl in ((a, 30.0), (b, 32.0), (d, 50.0)):
        store.add_metric(rid, "ppl", ppl)
    rows = queries.group_replicates(queries.leaderboard(Store(url, readonly=True)))
    assert sorted(map(tuple, rows["run_ids"])) == [(a, b), (c,), (d,)]
    pair = rows[rows["n"] == 2].iloc[0]
    assert pair["ppl"] == pytest.approx(31.0) and pair["ppl_std"] == pytest.approx(math.sqrt(2))
    assert (pair["ppl_lo"], pair["ppl_hi"]) == (pytest.approx(31 - math.sqrt(2)),
                                                pytest.approx(31 + math.sqrt(2)))


def test_intervals_from_ci_and_stderr(noise_store, noise_db):
    _, ids = noise_db
    df = queries.leaderboard(noise_store).set_index("id")
    fp = df.loc[ids["fp"]]
    assert (fp["ppl_lo"], fp["ppl_hi"]) == (19.6, 20.5)
    assert (fp["ppl_wikitext2_lo"], fp["ppl_wikitext2_hi"]) == (24.0, 26.1)
    assert fp["arc_easy/acc_lo"] == pytest.approx(0.60 - 1.96 * NOISE_SE)
    assert fp["acc_avg_hi"] == pytest.approx(0.625 + 1.96 * AVG_SE)
    qat0 = df.loc[ids["qat0"]]
    assert (qat0["ppl_fp_lo"], qat0["ppl_fp_hi"]) == (pytest.approx(30.3 / 20),
                                                      pytest.approx(31.9 / 20))
    rtn = df.loc[ids["rtn"]]
    assert rtn[["ppl_lo", "ppl_hi", "ppl_fp_lo", "acc_avg_lo", "arc_easy/acc_lo"]].isna().all()


def test_runs_stored_without_intervals_show_without_one(ro_store):
    df = queries.leaderboard(ro_store)
    assert df["ppl"].notna().any()
    assert df[["ppl_lo", "ppl_hi", "ppl_fp_lo", "ppl_fp_hi"]].isna().all().all()
    assert not [c for c in df.columns if c.endswith("/acc_lo")]
    ranks = dict(zip(df["method"] + df["status"], queries.rank_column(df, "ppl"), strict=True))
    # no interval, nothing within noise: qat (31) best, then strictly by PPL
    assert [ranks[m + "finished"] for m in ("qat", "bitdistiller", "onebit", "clip", "rtn")] \
        == [queries.BEST, "2", "3", "4", "5"]
    assert ranks["fpfinished"] == queries.FP_REFERENCE and ranks["bitdistillerfailed"] == ""


def test_one_bound_alone_is_no_interval(tmp_path):
    from tests.dashboard.conftest import _add_run

    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = Store(url)
    rid = _add_run(store, "rtn", 3)
    store.add_metric(rid, "ppl", 30.0)
    store.add_metric(rid, "ppl_ci95_low", 29.0)
    store.add_metric(rid, "ppl_ci95_high", None)
    df = queries.leaderboard(Store(url, readonly=True))
    assert math.isnan(df.loc[0, "ppl_lo"]) and math.isnan(df.loc[0, "ppl_hi"])


def test_derived_acc_avg_gets_the_tasks_errors_in_quadrature(tmp_path):
    from tests.dashboard.conftest import _add_run

    url = f"sqlite:///{tmp_path / 'q.db'}"
    store = Store(url)
    rid = _add_run(store, "rtn", 3)
    for task, acc, se in (("arc_easy", 0.4, 0.03), ("piqa", 0.6, 0.04)):
        store.add_metric(rid, "acc", acc, task=task)
        store.add_metric(rid, "acc_stderr", se, task=task)
    df = queries.leaderboard(Store(url, readonly=True))
    assert df.loc[0, "acc_avg_stderr"] == pytest.approx(0.05 / 2)
    assert df.loc[0, "acc_avg_lo"] == pytest.approx(0.5 - 1.96 * 0.025)


@pytest.mark.parametrize("best,other,expected", [
    ((30.4, 32.0), (31.2, 32.9), True),    # overlapping
    ((30.4, 32.0), (32.0, 33.0), True),    # touching: not resolved either
    ((30.4, 32.0), (35.2, 36.9), False),   # disjoint above
    ((0.53, 0.59), (0.40, 0.52), False),   # disjoint below
    ((30.4, 32.0), (31.0, math.nan), False),  # unknown: never waved through
    ((math.nan, math.nan), (31.0, 31.5), False),
])
def test_within_noise(best, other, expected):
    assert queries.within_noise(best, other) is expected


def test_noise_ranks_lower_and_higher_is_better():
    nan = math.nan
    # values 31.1 (best), 31.9 overlapping, 36.0 disjoint, 4500 without interval, no value
    ranks = queries.noise_ranks([36.0, 31.1, nan, 4500.0, 31.9],
                                [35.2, 30.4, nan, nan, 31.2], [36.9, 32.0, nan, nan, 32.9])
    assert ranks == ["3", queries.BEST, "", "4", queries.WITHIN_NOISE]
    acc = queries.noise_ranks([0.515, 0.558, 0.39], [0.487, 0.531, nan], [0.543, 0.586, nan],
                              higher_is_better=True)
    assert acc == [queries.WITHIN_NOISE, queries.BEST, "3"]
    # the best without an interval: nothing is within noise of it, every rank is strict
    assert queries.noise_ranks([1.0, 1.1], [nan, 1.0], [nan, 1.2]) == [queries.BEST, "2"]
    assert queries.noise_ranks([], [], []) == []


def test_rank_column_compares_within_one_protocol_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    fp = _run_with_eval(store, "fp", 20.0, 256, 2048, "a" * 64)
    best = _run_with_eval(store, "rtn", 30.0, 256, 2048, "b" * 64)
    near = _run_with_eval(store, "clip", 31.0, 256, 2048, "c" * 64)
    other = _run_with_eval(store, "qat", 30.5, 128, 256, "d" * 64)  # another window and cap
    for rid, lo, hi in ((fp, 19, 21), (best, 29.0, 30.8), (near, 30.5, 31.6),
                        (other, 29.9, 31.1)):
        store.add_metric(rid, "ppl_ci95_low", lo)
        store.add_metric(rid, "ppl_ci95_high", hi)
    df = queries.leaderboard(Store(url, readonly=True))
    ranks = dict(zip(df["id"], queries.rank_column(df, "ppl"), strict=True))
    assert ranks == {fp: queries.FP_REFERENCE, best: queries.BEST, near: queries.WITHIN_NOISE,
                     other: queries.BEST}  # its own protocol's best, not near rtn's


def test_noise_db_ranks(noise_store):
    rows = queries.group_replicates(queries.leaderboard(noise_store))
    by = dict(zip(rows["method"], queries.rank_column(rows, "ppl"), strict=True))
    assert by == {"fp": queries.FP_REFERENCE, "qat": queries.BEST,
                  "bitdistiller": queries.WITHIN_NOISE, "clip": "3", "rtn": "4"}
    acc = dict(zip(rows["method"], queries.rank_column(rows, "acc_avg", higher_is_better=True),
                   strict=True))
    assert acc == {"fp": queries.FP_REFERENCE, "qat": queries.BEST,
                   "bitdistiller": queries.WITHIN_NOISE, "clip": "", "rtn": "3"}
    # run by run, qat seed 2 (30.7) is best and the other seeds are within noise of it
    single = queries.group_replicates(queries.leaderboard(noise_store), by_spec=False)
    ranks = dict(zip(single["run_key"], queries.rank_column(single, "ppl"), strict=True))
    assert list(ranks.values()).count(queries.WITHIN_NOISE) == 3


def test_fp_ratio_keeps_working_with_intervals(noise_store, ro_store):
    df = queries.fp_ratio(noise_store).set_index("method")
    assert df.loc["bitdistiller", "ppl_fp"] == pytest.approx(31.9 / 20)
    assert df.loc["bitdistiller", "ppl_fp_lo"] == pytest.approx(31.2 / 20)
    assert df.loc["bitdistiller", "ppl_fp_hi"] == pytest.approx(32.9 / 20)
    assert math.isnan(df.loc["rtn", "ppl_fp_lo"]) and df.loc["rtn", "ppl_fp"] == 225.0
    old = queries.fp_ratio(ro_store)
    assert old["ppl_fp"].notna().all() and old["ppl_fp_lo"].isna().all()


def test_task_scores_and_group_scores_carry_stderr(noise_store, noise_db):
    _, ids = noise_db
    scores = queries.task_scores(noise_store)
    fp = scores[(scores["run_id"] == ids["fp"]) & (scores["task"] == "piqa")].iloc[0]
    assert fp["stderr"] == NOISE_SE
    assert (fp["value_lo"], fp["value_hi"]) == (pytest.approx(0.65 - 1.96 * NOISE_SE),
                                                pytest.approx(0.65 + 1.96 * NOISE_SE))
    assert scores[scores["run_id"] == ids["rtn"]][["value_lo", "value_hi"]].isna().all().all()
    rows = queries.group_replicates(queries.leaderboard(noise_store))
    grouped = queries.group_scores(scores, rows)
    assert len(grouped) == 4 * 2  # fp, rtn, the qat group, bitdistiller x two tasks
    qat = grouped[grouped["label"].str.contains("3 seeds") & (grouped["task"] == "arc_easy")]
    qat = qat.iloc[0]
    assert qat["value"] == pytest.approx((0.50 + 0.52 + 0.49) / 3)
    assert qat["value_n"] == 3 and qat["value_std"] == pytest.approx(0.01528, abs=1e-4)
    half = 1.96 * NOISE_SE  # wider than the std across seeds
    assert (qat["value_lo"], qat["value_hi"]) == (pytest.approx(qat["value"] - half),
                                                  pytest.approx(qat["value"] + half))


@pytest.mark.parametrize("args,expected", [
    ((31.1, 30.4, 32.0, 0.4583, 3), "31.10 ± 0.46 (n=3)"),
    ((31.0, 30.3, 31.9, math.nan, 1), "31.00 [30.30, 31.90]"),
    ((4500.0, math.nan, math.nan, math.nan, 1), "4,500.00"),
    ((math.nan, 1.0, 2.0, math.nan, 1), None),
    ((31.0, 30.3, 31.9, math.nan, 2), "31.00 [30.30, 31.90]"),  # one seed has no value
])
def test_fmt_uncertain(args, expected):
    assert queries.fmt_uncertain(*args) == expected
