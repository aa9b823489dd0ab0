"""dashboard/charts.py: pure builders, checked on the figures' data."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard import charts, queries


@pytest.fixture
def board(ro_store):
    return queries.leaderboard(ro_store)


def _is_empty_note(fig: go.Figure) -> bool:
    return not fig.data and len(fig.layout.annotations) == 1


def test_needs_log():
    assert charts.needs_log([20, 4500])
    assert not charts.needs_log([20, 31, 45])
    assert not charts.needs_log([float("nan"), 5, None])
    assert not charts.needs_log([])


def test_metric_bars_one_panel_per_metric_and_log_ppl(board):
    fig = charts.metric_bars(board, ["ppl", "size_mb", "nope"])
    assert {t.xaxis for t in fig.data} == {"x", "x2"}
    assert fig.layout.yaxis.type == "log"  # 20 .. 4500
    assert fig.layout.yaxis2.type != "log"
    methods = {t.name for t in fig.data}
    assert {"fp", "rtn", "bitdistiller"} <= methods
    # the failed run has no PPL: no bar for it
    assert all("e61093" not in str(list(t.x)) for t in fig.data if t.xaxis == "x")
    assert _is_empty_note(charts.metric_bars(board.iloc[0:0], ["ppl"]))


def test_pareto_front():
    df = pd.DataFrame({"size_mb": [10, 20, 30, 15], "ppl": [50, 20, 25, 60], "label": list("abcd"),
                       "method": ["m"] * 4})
    assert list(charts.pareto_front(df, "size_mb", "ppl")["label"]) == ["a", "b"]


def test_pareto_scatter(board):
    fig = charts.pareto_scatter(board)
    front = [t for t in fig.data if t.name == "Pareto front"][0]
    assert list(front.x) == [40.0, 60.0, 80.0, 270.0]
    assert fig.layout.yaxis.type == "log"
    assert _is_empty_note(charts.pareto_scatter(board[board["status"] == "failed"]))


def test_accuracy_radar(ro_store):
    scores = queries.task_scores(ro_store)
    extra = scores[scores["task"] == "piqa"].assign(task="hellaswag", value=0.3)
    fig = charts.accuracy_radar(pd.concat([scores, extra]))
    assert len(fig.data) == scores["label"].nunique()
    assert all(isinstance(t, go.Scatterpolar) for t in fig.data)
    assert list(fig.data[0].theta) == ["arc_easy", "hellaswag", "piqa", "arc_easy"]  # closed
    assert _is_empty_note(charts.accuracy_radar(scores.iloc[0:0]))


def test_accuracy_with_two_tasks_is_bars(ro_store):
    fig = charts.accuracy_radar(queries.task_scores(ro_store))
    assert all(isinstance(t, go.Bar) for t in fig.data)
    assert set(fig.data[0].x) == {"arc_easy", "piqa"}


def test_training_curves(ro_store, fake_db):
    _, ids = fake_db
    steps = queries.train_steps(ro_store, [ids["qat"], ids["bitdistiller"]])
    fig = charts.training_curves(steps)
    assert len(fig.data) == 2 * 3  # two runs x (loss, lr, tokens/s)
    assert sum(t.showlegend for t in fig.data) == 2
    assert {t.yaxis for t in fig.data} == {"y", "y2", "y3"}
    assert _is_empty_note(charts.training_curves(steps.iloc[0:0]))


def test_layer_heatmap_before_after(ro_store, fake_db):
    _, ids = fake_db
    stats = queries.layer_stats(ro_store, [ids["clip"]])
    fig = charts.layer_heatmap(stats)
    assert [a.text for a in fig.layout.annotations] == ["rtn_output_mse", "clip_output_mse"]
    heat = fig.data[0]
    assert list(heat.y) == ["layers.0", "layers.1"] and len(heat.x) == 7
    assert fig.data[0].zmin == fig.data[1].zmin  # one colour scale
    ratio = charts.error_reduction(stats, "rtn_output_mse", "clip_output_mse")
    assert pytest.approx(0.6) == float(pd.DataFrame(ratio.data[0].z).mean().mean())


def test_layer_heatmap_onebit_pair(ro_store, fake_db):
    _, ids = fake_db
    fig = charts.layer_heatmap(queries.layer_stats(ro_store, [ids["onebit"]]))
    assert [a.text for a in fig.layout.annotations] == ["svd_rank1_error", "svid_error"]
    assert _is_empty_note(charts.layer_heatmap(queries.layer_stats(ro_store, [ids["failed"]])))
    assert _is_empty_note(charts.error_reduction(
        queries.layer_stats(ro_store, [ids["onebit"]]), "rtn_output_mse", "clip_output_mse"))


def test_timings_bar():
    fig = charts.timings_bar({"load": 1.0, "train": 30.0})
    assert list(fig.data[0].y) == ["load", "train"]
    assert _is_empty_note(charts.timings_bar({}))


def test_constant_series_gets_a_visible_axis():
    steps = pd.DataFrame({"label": ["a"] * 3, "step": [1, 2, 3], "loss": [3.0, 2.0, 1.5],
                          "lr": [1e-5] * 3, "tokens_per_s": [100.0, 120.0, 110.0]})
    fig = charts.training_curves(steps)
    assert tuple(fig.layout.yaxis2.range) == (0, 2e-5)
    assert fig.layout.yaxis.range is None
