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


def test_accuracy_bars(ro_store):
    scores = queries.task_scores(ro_store)
    extra = scores[scores["task"] == "piqa"].assign(task="hellaswag", value=0.3)
    fig = charts.accuracy_bars(pd.concat([scores, extra]))
    assert all(isinstance(t, go.Bar) for t in fig.data)
    assert len(fig.data) == scores["label"].nunique()  # no stderr stored: one trace per run
    assert set(fig.data[0].x) == {"arc_easy", "hellaswag", "piqa"}
    assert all(t.error_y.visible is None for t in fig.data)  # nothing known, nothing drawn
    assert _is_empty_note(charts.accuracy_bars(scores.iloc[0:0]))


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


# --- whiskers ---------------------------------------------------------------------------------
from tests.dashboard.conftest import NOISE_PPL, NOISE_SE  # noqa: E402


@pytest.fixture
def noise_rows(noise_db):
    from harness.store import Store

    return queries.group_replicates(queries.leaderboard(Store(noise_db[0], readonly=True)))


def _whiskers(fig: go.Figure, axis: str = "x") -> dict[str, tuple[float, float]]:
    """``{x or label: (plus, minus)}`` of every whiskered bar or point on one x axis."""
    out = {}
    for t in fig.data:
        if t.xaxis not in (axis, None) or t.error_y.visible is not True:
            continue
        minus = t.error_y.array if t.error_y.symmetric else t.error_y.arrayminus
        names = t.text if isinstance(t, go.Scatter) else t.x
        for name, p, m in zip(names, t.error_y.array, minus, strict=True):
            out[name] = (p, m)
    return out


def _bare(fig: go.Figure, axis: str = "x") -> set[str]:
    """Bars or points drawn without any error_y."""
    return {n for t in fig.data if t.xaxis in (axis, None) and t.error_y.visible is None
            for n in (t.text if isinstance(t, go.Scatter) else t.x) or ()}


def test_error_arrays_asymmetric_missing_and_zero_width():
    df = pd.DataFrame({"ppl": [20.0, 4500.0, 31.0, 80.0, 30.0],
                       "ppl_lo": [19.6, float("nan"), 30.3, 80.0, 30.1],
                       "ppl_hi": [20.5, float("nan"), 31.9, 80.0, 31.0]})
    plus, minus = charts.error_arrays(df, "ppl")
    assert plus[0] == pytest.approx(0.5) and minus[0] == pytest.approx(0.4)  # high-v, v-low
    assert plus[2] == pytest.approx(0.9) and minus[2] == pytest.approx(0.7)
    assert pd.isna(plus[1]) and pd.isna(minus[1])  # no interval
    assert pd.isna(plus[3]) and pd.isna(minus[3])  # zero width: no whisker either
    assert minus[4] == 0.0 and plus[4] == pytest.approx(1.0)  # a bound past the value: clipped
    none = charts.error_arrays(df[["ppl"]], "ppl")  # no interval columns at all
    assert pd.isna(none[0]).all() and pd.isna(none[1]).all()


def test_metric_bars_whiskers_only_where_an_interval_is_known(noise_rows):
    fig = charts.metric_bars(noise_rows, ["ppl", "ppl_fp", "size_mb", "acc_avg"])
    label = dict(zip(noise_rows["method"], noise_rows["label"], strict=True))
    ppl = _whiskers(fig, "x")
    assert set(ppl) == {label[m] for m in ("fp", "qat", "bitdistiller", "clip")}
    _, lo, hi = NOISE_PPL["fp"]
    assert ppl[label["fp"]] == (pytest.approx(hi - 20.0), pytest.approx(20.0 - lo))
    assert ppl[label["qat"]] == (pytest.approx(0.9), pytest.approx(0.7))  # group: CI > std
    assert _bare(fig, "x") == {label["rtn"]}  # stored without an interval: no whisker at all
    ratio = _whiskers(fig, "x2")
    assert ratio[label["bitdistiller"]] == (pytest.approx((32.9 - 31.9) / 20),
                                            pytest.approx((31.9 - 31.2) / 20))
    assert _whiskers(fig, "x3") == {}  # size: no uncertainty, and the seeds agree
    acc = _whiskers(fig, "x4")
    assert set(acc) == {label[m] for m in ("fp", "qat", "bitdistiller")}
    se = 1.96 * (2 * NOISE_SE ** 2) ** 0.5 / 2
    assert acc[label["fp"]] == (pytest.approx(se), pytest.approx(se))
    assert [t.error_y.symmetric for t in fig.data if t.xaxis == "x4" and t.error_y.visible] \
        == [True] * 3
    bars_per_panel = [sum(len(t.x) for t in fig.data if t.xaxis == a)
                      for a in ("x", "x2", "x3", "x4")]
    assert bars_per_panel == [5, 5, 5, 4]  # splitting whiskered rows loses no bar


def test_pareto_scatter_whiskers(noise_rows):
    fig = charts.pareto_scatter(noise_rows)
    label = dict(zip(noise_rows["method"], noise_rows["label"], strict=True))
    w = _whiskers(fig)
    assert set(w) == {label[m] for m in ("fp", "qat", "bitdistiller", "clip")}
    assert w[label["clip"]] == (pytest.approx(0.9), pytest.approx(0.8))
    assert label["rtn"] in _bare(fig)
    assert sum(t.showlegend is not False for t in fig.data if t.name == "qat") == 1


def test_accuracy_bars_whiskers_are_symmetric_stderr(noise_db, noise_rows):
    from harness.store import Store

    scores = queries.task_scores(Store(noise_db[0], readonly=True))
    fig = charts.accuracy_bars(queries.group_scores(scores, noise_rows))
    label = dict(zip(noise_rows["method"], noise_rows["label"], strict=True))
    whiskered = [t for t in fig.data if t.error_y.visible]
    assert {t.name for t in whiskered} == {label[m] for m in ("fp", "qat", "bitdistiller")}
    assert all(t.error_y.symmetric for t in whiskered)
    fp = next(t for t in whiskered if t.name == label["fp"])
    assert list(fp.error_y.array) == pytest.approx([1.96 * NOISE_SE] * 2)
    rtn = [t for t in fig.data if t.name == label["rtn"]]
    assert len(rtn) == 1 and rtn[0].error_y.visible is None


def test_runs_without_intervals_draw_no_whiskers(board, ro_store):
    figs = [charts.metric_bars(board, ["ppl", "ppl_fp", "acc_avg"]),
            charts.pareto_scatter(board),
            charts.accuracy_bars(queries.task_scores(ro_store))]
    assert all(t.error_y.visible is None for f in figs for t in f.data)
