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
    assert df.loc[ids["qat"], "acc_avg"] == pytest.approx((0.52 + 0.63) / 2)  # stored acc_avg
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


def test_task_scores_prefers_acc_norm(ro_store, fake_db):
    _, ids = fake_db
    df = queries.task_scores(ro_store, [ids["rtn"]])
    assert set(df["task"]) == {"arc_easy", "piqa"}
    assert set(df["metric"]) == {"acc_norm"}
    assert df.set_index("task").loc["arc_easy", "value"] == pytest.approx(0.28)
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
