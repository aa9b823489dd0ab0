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


# --- uncertainty: seed groups, whiskers, within-noise marks ----------------------------------
def test_leaderboard_groups_seeds_and_marks_within_noise(monkeypatch, noise_db):
    from dashboard import queries

    url, ids = noise_db
    at = _app(monkeypatch, url)
    _ok(at)
    df = at.dataframe[0].value.set_index("method")
    assert len(df) == len(ids) - 2  # the three qat seeds are one row
    assert df.loc["qat", "seeds"] == "0, 1, 2"
    assert df.loc["qat", "PPL"] == "31.10 ± 0.46 (n=3)"
    assert df.loc["bitdistiller", "PPL"] == "31.90 [31.20, 32.90]"
    assert df.loc["rtn", "PPL"] == "4,500.00"  # stored before intervals: the bare number
    assert df.loc["bitdistiller", "PPL/FP"] == "1.595 [1.560, 1.645]"
    assert df.loc["fp", "PPL wikitext2"] == "25.00 [24.00, 26.10]"
    assert dict(df["PPL rank"]) == {"fp": queries.FP_REFERENCE, "qat": queries.BEST,
                                    "bitdistiller": queries.WITHIN_NOISE, "clip": "3",
                                    "rtn": "4"}
    assert df.loc["bitdistiller", "acc rank"] == queries.WITHIN_NOISE
    assert list(df.index[:2]) == ["fp", "qat"]  # still sorted by PPL/FP
    assert "in 5 rows (1 seed group)" in _text(at) and "ddof=1" in _text(at)
    # every run stays reachable: the picker lists each seed
    assert len(at.selectbox(key="board_pick").options) == len(ids)
    at.toggle(key="board_group").set_value(False).run()
    _ok(at)
    runs = at.dataframe[0].value
    assert len(runs) == len(ids) and (runs["method"] == "qat").sum() == 3


def test_compare_draws_whiskers_and_marks_within_noise(monkeypatch, noise_db):
    from dashboard import queries

    at = _app(monkeypatch, noise_db[0], page="compare")
    _ok(at)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 3  # metrics, Pareto, accuracy
    for spec in specs:
        whiskered = [t for t in spec["data"] if t.get("error_y", {}).get("visible")]
        assert whiskered, spec["layout"].get("title")
        # rtn has no interval: it is drawn, in a trace without error_y
        bare = [t for t in spec["data"] if "error_y" not in t and t.get("name") != "Pareto front"]
        assert bare
    text = _text(at)
    line = next(m for m in text.splitlines() if "best PPL" in m)
    assert queries.WITHIN_NOISE in line and "bitdistiller" in line.split(queries.WITHIN_NOISE)[1]
    assert "(3 seeds)" in line.split(queries.WITHIN_NOISE)[0]
    assert "FP run's own uncertainty not included" in text
    ranks = next(d.value for d in at.dataframe)
    assert dict(zip(ranks["PPL rank"], ranks["PPL"], strict=True))[queries.WITHIN_NOISE] \
        == "31.90 [31.20, 32.90]"
    at.toggle(key="cmp_group").set_value(False).run()
    _ok(at)
    pareto = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert sum(len(t["text"]) for t in pareto["data"] if t.get("name") == "qat") == 3


def test_detail_shows_interval_and_links_the_other_seeds(monkeypatch, noise_db):
    from harness.store import Store

    url, ids = noise_db
    store = Store(url, readonly=True)
    key = store.get_run(ids["qat1"]).run_key
    at = _app(monkeypatch, url, page="detail", run=key)
    _ok(at)
    text = _text(at)
    assert "**PPL** 31.60 [30.90, 32.50]" in text
    others = [store.get_run(ids[n]).run_key for n in ("qat0", "qat2")]
    assert f"[seed 0: {others[0]}](?page=detail&run={others[0]})" in text
    assert f"seed 2: {others[1]}" in text and f"seed 1: {key}" not in text
