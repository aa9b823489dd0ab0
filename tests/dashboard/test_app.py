"""dashboard/app.py through streamlit.testing's AppTest: every page, with data, empty, failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
PAGES = ["leaderboard", "compare", "training", "layers", "detail"]


def _app(monkeypatch, url: str, **params) -> AppTest:
    monkeypatch.setenv("LOWBIT_DB", url)
    monkeypatch.setattr("sys.argv", ["app.py"])
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in params.items():
        at.query_params[k] = v
    return at.run()


def _text(at: AppTest) -> str:
    parts = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def _charts(at: AppTest) -> list[tuple[int, list[str]]]:
    """(traces, annotation texts) of every plotly chart on the page; an empty chart has no
    traces and a note saying why."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return [(len(s["data"]), [a.get("text") for a in s["layout"].get("annotations", [])])
            for s in specs]


def _ok(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert "could not be drawn" not in _text(at)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(monkeypatch, fake_db, page):
    at = _app(monkeypatch, fake_db[0])
    at.sidebar.radio(key="page").set_value(page).run()
    _ok(at)
    assert at.title[0].value == {"leaderboard": "Leaderboard", "compare": "Compare",
                                 "training": "Training", "layers": "Layers",
                                 "detail": "Run detail"}[page]


def test_leaderboard_table(monkeypatch, fake_db):
    at = _app(monkeypatch, fake_db[0])
    _ok(at)
    df = at.dataframe[0].value
    assert {"run", "method", "bits", "PPL", "PPL/FP", "arc_easy", "piqa", "acc avg", "size MB",
            "bits/weight", "status"} <= set(df.columns)
    assert len(df) == len(fake_db[1])
    assert df["run"].str.startswith("?page=detail&run=").all()
    assert df.iloc[0]["method"] == "fp"  # sorted by PPL/FP
    assert "1 failed" in _text(at)


def test_leaderboard_filters(monkeypatch, fake_db):
    at = _app(monkeypatch, fake_db[0])
    at.multiselect(key="filter_method").set_value(["rtn", "clip"]).run()
    _ok(at)
    assert set(at.dataframe[0].value["method"]) == {"rtn", "clip"}
    at.multiselect(key="filter_status").set_value(["failed"]).run()
    assert list(at.dataframe[0].value["status"]) == []  # failed clip/rtn: none


def test_open_detail_button(monkeypatch, fake_db):
    at = _app(monkeypatch, fake_db[0])
    label = next(o for o in at.selectbox(key="board_pick").options if o.startswith("qat"))
    at.selectbox(key="board_pick").set_value(label).run()
    at.button[0].click().run()
    _ok(at)
    assert at.title[0].value == "Run detail"
    assert at.selectbox(key="detail_pick").value == label
    assert "harness export" in _text(at) and "--packed" in _text(at)


def test_detail_of_failed_run_by_query_params(monkeypatch, fake_db):
    url, ids = fake_db
    from harness.store import Store

    key = Store(url, readonly=True).get_run(ids["failed"]).run_key
    at = _app(monkeypatch, url, page="detail", run=key)
    _ok(at)
    assert at.title[0].value == "Run detail"
    assert any("loss became nan" in str(c.value) for c in at.code)
    assert "No metrics stored." in _text(at)
    assert "harness export" not in _text(at)  # nothing to export from a failed run


def test_detail_of_running_run(monkeypatch, fake_db):
    url, ids = fake_db
    from harness.store import Store

    key = Store(url, readonly=True).get_run(ids["running"]).run_key
    at = _app(monkeypatch, url, page="detail", run=key)
    _ok(at)
    assert "still running" in _text(at)


def test_compare_offers_finished_runs_only(monkeypatch, fake_db):
    """A failed run has no metrics to plot, so the compare page does not offer it (nor the
    running one); with no run selected each chart says it is empty instead of failing."""
    from dashboard import queries
    from harness.store import Store

    url, ids = fake_db
    board = queries.leaderboard(Store(url, readonly=True))
    label = dict(zip(board["id"], board["label"], strict=True))
    at = _app(monkeypatch, url)
    at.sidebar.radio(key="page").set_value("compare").run()
    _ok(at)
    runs = at.multiselect(key="cmp_runs")
    finished = [label[ids[m]] for m in ("fp", "rtn", "clip", "qat", "bitdistiller", "onebit")]
    assert sorted(runs.options) == sorted(finished)
    assert label[ids["failed"]] not in runs.options and label[ids["running"]] not in runs.options
    charts = _charts(at)  # metrics, Pareto, accuracy
    assert len(charts) == 3 and all(traces for traces, _ in charts), charts
    runs.set_value([]).run()
    _ok(at)
    empty = [(0, ["no runs with these metrics"]),
             (0, ["no finished runs with size and perplexity"])]
    assert _charts(at) == empty
    assert "No task accuracy stored" in _text(at)
    at.radio(key="cmp_x").set_value("bits_per_weight").run()
    _ok(at)
    assert _charts(at) == empty


def test_layers_page_switch_run(monkeypatch, fake_db):
    at = _app(monkeypatch, fake_db[0], page="layers")
    _ok(at)
    onebit = next(o for o in at.selectbox(key="layers_run").options if o.startswith("onebit"))
    at.selectbox(key="layers_run").set_value(onebit).run()
    _ok(at)
    stats = [m for m in at.multiselect if str(m.key).startswith("layers_stats_")][0]
    assert stats.value == ["svd_rank1_error", "svid_error"]


@pytest.mark.parametrize("page", ["leaderboard", "detail"])
def test_empty_database(monkeypatch, empty_db, page):
    at = _app(monkeypatch, empty_db, page=page)
    _ok(at)
    assert "no runs yet" in _text(at)
    assert any("harness run --methods rtn --bits 3" in str(c.value) for c in at.code)


def test_missing_database_is_one_line(monkeypatch, tmp_path):
    at = _app(monkeypatch, f"sqlite:///{tmp_path / 'nope.db'}")
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_only_a_failed_run(monkeypatch, tmp_path):
    from harness.store import Store
    from tests.dashboard.conftest import _add_run

    url = f"sqlite:///{tmp_path / 'f.db'}"
    _add_run(Store(url), "rtn", 3, status="failed", error="HarnessError: out of memory")
    for page in PAGES:
        at = _app(monkeypatch, url, page=page)
        _ok(at)
        if page == "compare":
            assert "No finished runs to compare yet." in _text(at)
    assert "out of memory" in _text(at)
