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
