"""harness/orchestration/recorders.py: what reaches the store, and what may not."""

import math

import numpy as np
import pytest
import torch

from harness.orchestration.recorders import BufferRecorder, StoreRecorder, replay


def test_numbers_of_every_kind_become_floats_and_none_stays_none(store):
    run_id = store.begin_run(_spec()).id
    rec = StoreRecorder(store, run_id)
    rec.metric("ppl", torch.tensor(12.5))
    rec.metric("bits_per_weight", np.float32(2.25))
    rec.metric("not_measured", None)
    rec.metric("diverged", float("inf"))
    got = store.metric_dict(run_id)
    assert got["ppl"] == 12.5 and got["bits_per_weight"] == 2.25
    assert got["not_measured"] is None and math.isinf(got["diverged"])


@pytest.mark.parametrize("bad", ["12.5 (approx)", torch.ones(2), object()])
def test_a_value_that_is_not_a_number_is_an_error_naming_the_metric(store, bad):
    run_id = store.begin_run(_spec()).id
    with pytest.raises(TypeError, match="metric 'ppl'.*is not a number"):
        StoreRecorder(store, run_id).metric("ppl", bad)
    with pytest.raises(TypeError, match="metric 'ppl'"):
        BufferRecorder().metric("ppl", bad)
    with pytest.raises(TypeError, match="'train loss'"):
        BufferRecorder().train_step(1, bad, 1e-5, 100.0)
    with pytest.raises(TypeError, match="'svid_error of layers.0.q_proj'"):
        StoreRecorder(store, run_id).layer_stat("layers.0", "q_proj", "svid_error", bad)
    assert "ppl" not in store.metric_dict(run_id)  # nothing half-written


def test_buffered_records_replay_to_the_same_rows(store):
    run_id = store.begin_run(_spec()).id
    buf = BufferRecorder()
    buf.metric("ppl", torch.tensor(3.0))
    buf.train_step(1, torch.tensor(2.5), 1e-5, 10.0)
    buf.layer_stat("layers.0", "q_proj", "mse", 0.125)
    replay(buf.drain(), store, run_id)
    assert buf.records == []
    assert store.metric_dict(run_id)["ppl"] == 3.0
    assert [(s.step, s.loss) for s in store.train_steps(run_id)] == [(1, 2.5)]


def _spec():
    from harness.config import EvalSpec, RunSpec

    return RunSpec(model="tiny-llama", method="rtn",
                   config={"bits": 3, "group_size": 64, "fmt": "int"}, eval=EvalSpec())


def test_series_travel_through_a_worker_buffer_to_the_store(store):
    from harness.config import EvalSpec, RunSpec
    from harness.orchestration.recorders import BufferRecorder, replay

    run = store.begin_run(RunSpec(model="tiny-llama", method="rtn", config={"bits": 3},
                                  eval=EvalSpec()))
    buf = BufferRecorder()
    buf.series("nll", torch.tensor([3.25, 2.5, 4.0]), task="ppl")
    buf.series("correct", [True, False], task="shakespeare_cloze")
    replay(buf.drain(), store, run.id)
    assert store.series(run.id) == {("nll", "ppl"): [3.25, 2.5, 4.0],
                                    ("correct", "shakespeare_cloze"): [1.0, 0.0]}
    assert store.series(run.id, "nll") == {("nll", "ppl"): [3.25, 2.5, 4.0]}
    store.begin_run(RunSpec(model="tiny-llama", method="rtn", config={"bits": 3},
                            eval=EvalSpec()))  # a rerun recomputes them
    assert store.series(run.id) == {}


def test_a_database_from_before_series_reads_without_them(store, db_url):
    import sqlite3
    from contextlib import closing

    from harness.config import EvalSpec, RunSpec
    from harness.store import Store

    run = store.begin_run(RunSpec(model="tiny-llama", method="rtn", config={"bits": 3},
                                  eval=EvalSpec()))
    store.engine.dispose()
    with closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as con:
        con.execute("DROP TABLE series")
        con.commit()
    old = Store(db_url, readonly=True)  # the dashboard's and `harness list`'s store
    assert old.series(run.id) == {}
    Store(db_url)  # a writer adds the table to the old database
    assert Store(db_url, readonly=True).series(run.id) == {}
