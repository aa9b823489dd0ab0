"""The dashboard shows methods it has never heard of: the baselines' real runs, no code for them.

Real tiny-llama runs of the post-training baselines and the QAT baselines (paretoq comes from
its out-of-tree plugin) go through the CLI into a database that the app then reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.dashboard.test_app import PAGES, _app, _ok, _text

ROOT = Path(__file__).resolve().parents[2]
NEW = ("gptq", "awq", "hqq", "bitnet", "paretoq")
QUICK = ["--model", "tiny-llama", "--max-eval-tokens", "512", "--seq-len", "128", "--tasks", "",
         "--set", "calib_samples=8", "--set", "calib_seq_len=32"]
TRAIN = ["--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "train.batch_size=1",
         "--set", "data=corpus"]


@pytest.fixture(scope="module")
def baselines_db(tmp_path_factory):
    from harness.cli import main

    tmp = tmp_path_factory.mktemp("baselines")
    url = f"sqlite:///{tmp / 'b.db'}"
    common = ["--db", url, "--output-dir", str(tmp / "runs")]
    assert main(["run", "--methods", "gptq,awq,hqq", "--bits", "2", *QUICK, *common]) == 0
    assert main(["run", "--methods", "bitnet,paretoq", "--no-fp", *QUICK, *TRAIN, *common]) == 0
    return url


def test_dashboard_code_names_none_of_them():
    code = "\n".join(p.read_text() for p in (ROOT / "dashboard").glob("*.py"))
    for name in NEW:
        assert not re.search(rf"\b{name}\b", code, re.IGNORECASE), name


def test_leaderboard_lists_every_new_method(monkeypatch, baselines_db):
    at = _app(monkeypatch, baselines_db)
    _ok(at)
    df = at.dataframe[0].value
    assert set(NEW) <= set(df["method"])
    rows = df[df["method"].isin(NEW)]
    assert (rows["status"] == "finished").all()
    # "ratio [lo, hi]": the FP run of the same protocol was found for each
    ratios = rows["PPL/FP"].str.extract(r"^([0-9.,e+]+) \[")[0]
    assert ratios.notna().all(), rows["PPL/FP"].tolist()
    assert (ratios.str.replace(",", "").astype(float) > 0).all()  # random tiny model: any side of 1
    assert rows["bits/weight"].notna().all()


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_them(monkeypatch, baselines_db, page):
    at = _app(monkeypatch, baselines_db)
    at.sidebar.radio(key="page").set_value(page).run()
    _ok(at)


@pytest.mark.parametrize("method", ["paretoq", "bitnet"])
def test_detail_of_a_trained_baseline(monkeypatch, baselines_db, method):
    from harness.store import Store

    run = next(r for r in Store(baselines_db, readonly=True).runs() if r.method == method)
    at = _app(monkeypatch, baselines_db, page="detail", run=run.run_key)
    _ok(at)
    assert at.subheader[0].value.startswith(method)
    assert "No run" not in _text(at)  # the page found it rather than the latest run
    assert any(m.label == "Bits / weight" for m in at.metric)
