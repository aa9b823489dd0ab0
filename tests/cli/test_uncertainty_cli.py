"""Uncertainty end to end on tiny-llama: intervals in every table, replicates, paired compare,
evaluation data sets chosen with --ppl-data."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import QUICK

NO_TASKS = ["--tasks", ""]


@pytest.fixture
def run_cli(cli, db_url):
    def run(*args):
        return cli(*args, "--db", db_url)
    return run


def _runs(run_cli) -> list[dict]:
    code, out, err = run_cli("list", "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """One database for the read-only checks: fp, then rtn at 3 and 2 bits, seeds 0 and 1."""
    import contextlib
    import io

    from harness.cli import main

    tmp = tmp_path_factory.mktemp("uncertainty")
    db = f"sqlite:///{tmp / 'harness.db'}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["run", "--methods", "rtn", "--bits", "3,2", "--seeds", "0,1", *QUICK,
                     *NO_TASKS, "--output-dir", str(tmp / "runs"), "--db", db])
    assert code == 0
    return db, out.getvalue()


@pytest.fixture
def ladder_cli(cli, ladder):
    def run(*args):
        return cli(*args, "--db", ladder[0])
    return run


def _run(runs, bits, seed=0):
    return next(r for r in runs if r["method"] == "rtn" and r["bits"] == bits
                and r["seed"] == seed)


def test_quick_run_shows_ppl_with_its_interval_everywhere(ladder, ladder_cli):
    m = _run(_runs(ladder_cli), 3)["metrics"]
    assert m["ppl_ci95_low"] < m["ppl"] < m["ppl_ci95_high"]
    cell = f"{m['ppl_ci95_low']:,.2f}-{m['ppl_ci95_high']:,.2f}"
    assert cell in ladder[1]  # the run's own table
    code, out, _ = ladder_cli("list")
    assert cell in out and "PPL 95% CI" in out
    code, out, _ = ladder_cli("show", _run(_runs(ladder_cli), 3)["run_key"])
    assert f"95% CI {cell}" in out


def test_per_window_nll_is_stored_and_reproduces_the_ppl(ladder):
    import math

    from harness.store import Store

    store = Store(ladder[0], readonly=True)
    for run in store.runs():
        nll = store.series(run.id)[("nll", "ppl")]
        assert len(nll) == 2048 // 256  # one value per window
        assert math.exp(sum(nll) / len(nll)) == pytest.approx(
            store.metric_dict(run.id)["ppl"], rel=1e-9)


def test_seeds_run_replicates_grouped_with_mean_std_n(ladder, ladder_cli):
    runs = _runs(ladder_cli)
    assert sorted(r["seed"] for r in runs if r["method"] == "rtn") == [0, 0, 1, 1]
    assert [r["seed"] for r in runs if r["method"] == "fp"] == [0]  # one shared reference
    assert "replicates" in ladder[1] and ladder[1].count("(n=2)") >= 2
    code, out, _ = ladder_cli("list")
    lines = [x for x in out.splitlines() if "(n=2)" in x]
    assert len(lines) == 2 and all(x.split()[0] == "rtn" and "0,1" in x for x in lines)
    # RTN has no randomness: the two seeds agree exactly, and the std says so
    assert all("±0.00 (n=2)" in x for x in lines)


def test_compare_pairs_two_runs_on_their_windows(ladder_cli):
    runs = _runs(ladder_cli)
    a, b = _run(runs, 3), _run(runs, 2)
    code, out, err = ladder_cli("compare", a["run_key"], b["run_key"], "--json")
    assert code == 0, err
    row = json.loads(out)["ppl"][0]
    assert row["metric"] == "ppl" and row["windows"] == 8
    assert row["ratio"] == pytest.approx(a["metrics"]["ppl"] / b["metrics"]["ppl"])
    assert row["ci95_low"] <= row["ratio"] <= row["ci95_high"]
    code, out, _ = ladder_cli("compare", a["run_key"], b["run_key"])
    assert "A/B" in out and ("within noise" in out or "better" in out)
    # two seeds of deterministic RTN: identical windows, a ratio of exactly 1, not significant
    code, out, _ = ladder_cli("compare", a["run_key"], _run(runs, 3, seed=1)["run_key"],
                              "--json")
    row = json.loads(out)["ppl"][0]
    assert row["ratio"] == 1.0 and not row["significant"]


def test_compare_refuses_runs_without_per_window_results(ladder, cli, tmp_path):
    import sqlite3
    from contextlib import closing

    from harness.orchestration.plan import build_spec
    from harness.store import Store

    db = tmp_path / "copy.db"
    with closing(sqlite3.connect(ladder[0].removeprefix("sqlite:///"))) as src, \
            closing(sqlite3.connect(db)) as dst:
        src.backup(dst)  # a file copy would miss what still sits in the WAL
    store = Store(f"sqlite:///{db}")
    old = store.begin_run(build_spec("tiny-llama", "clip", {"bits": 2}, "quick",
                                     eval_overrides={"max_tokens": 2048, "seq_len": 256}))
    store.add_metric(old.id, "ppl", 99.0)  # a run as stored before series existed
    store.end_run(old.id, "finished")
    new = next(r for r in store.runs() if r.method == "rtn")
    code, _, err = cli("compare", new.run_key, old.run_key, "--db", f"sqlite:///{db}")
    assert code == 2 and "no per-window results" in err and "--force" in err
    code, _, err = cli("compare", new.run_key, new.run_key, "--db", f"sqlite:///{db}")
    assert code == 2 and "two different runs" in err


def test_seed_and_seeds_together_is_one_error_line(run_cli):
    code, _, err = run_cli("run", "--methods", "rtn", "--seed", "1", "--seeds", "0,1", *QUICK)
    assert code == 2 and "keep one" in err and len(err.strip().splitlines()) == 1


def test_ppl_data_file_equals_harness_eval_text(run_cli, tmp_path):
    from harness import data

    text = tmp_path / "Sonnets.txt"
    text.write_text(data.read_play("sonnets")[:20000])
    code, _, err = run_cli("run", "--methods", "rtn", "--bits", "3", *QUICK, *NO_TASKS,
                           "--no-fp", "--ppl-data", f"shakespeare,{text}",
                           "--output-dir", tmp_path / "runs")
    assert code == 0, err
    run = _runs(run_cli)[0]
    m = run["metrics"]
    assert m["ppl_sonnets"] > 0 and m["ppl_sonnets"] != m["ppl"]
    assert m["ppl_sonnets_ci95_low"] < m["ppl_sonnets"] < m["ppl_sonnets_ci95_high"]
    code, out, err = run_cli("eval", run["run_key"], "--text", text, "--max-tokens", "2048",
                             "--seq-len", "256")
    assert code == 0, err
    assert float(out.split()[0].split("=")[1]) == pytest.approx(m["ppl_sonnets"], rel=1e-4)


def test_default_evaluation_keeps_the_run_keys_of_stored_runs():
    """The FP and RTN w3 quick runs of SmolLM2 in docs/results keep their keys: the new
    evaluation settings at their defaults are not part of the hash."""
    from harness.orchestration.plan import build_spec

    fp = build_spec("smollm2-135m", "fp", {}, "quick")
    rtn = build_spec("smollm2-135m", "rtn", {"bits": 3, "group_size": 64}, "quick")
    assert (fp.run_key, rtn.run_key) == ("41433650d34a", "24afcec20a77")
    other = build_spec("smollm2-135m", "fp", {}, "quick",
                       eval_overrides={"ppl_data": "shakespeare,wikitext2"})
    assert other.run_key != fp.run_key


def test_ppl_data_wikitext2_from_the_cache_and_one_error_line_without(cli, db_url, tmp_path,
                                                                      hf):
    from harness import data
    from harness.store import Store
    from tests.helpers.hf_cache import build_hf_cache

    args = ["run", "--methods", "rtn", "--bits", "3", *QUICK, *NO_TASKS, "--no-fp",
            "--ppl-data", "wikitext2", "--output-dir", tmp_path / "runs", "--db", db_url]
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "wikitext" in err and "HF_DATASETS_OFFLINE=0" in err
    assert Store(db_url).runs() == []  # refused before any run started

    lines = data.read_play("macbeth").splitlines()[:2000]
    build_hf_cache(hf[0], "wikitext", "wikitext-2-raw-v1", "test", {"text": lines})
    code, _, err = cli(*args)
    assert code == 0, err
    m = Store(db_url).metric_dict(Store(db_url).runs()[0].id)
    assert "ppl" not in m  # only the data asked for
    assert m["ppl_wikitext2_ci95_low"] < m["ppl_wikitext2"] < m["ppl_wikitext2_ci95_high"]
    assert m["ppl_wikitext2_tokens"] == 2048


def test_humaneval_needs_allow_code_eval_in_run_and_eval(ladder_cli):
    key = _runs(ladder_cli)[0]["run_key"]
    for args in (["run", "--methods", "rtn", *QUICK, "--tasks", "humaneval"],
                 ["eval", key, "--tasks", "humaneval"]):
        code, _, err = ladder_cli(*args)
        assert code == 2 and "--allow-code-eval" in err and len(err.strip().splitlines()) == 1


def test_eval_passes_num_fewshot_to_the_tasks(ladder_cli, monkeypatch):
    import harness.eval.accuracy as accuracy

    seen = {}

    def fake(model, tok, tasks, limit, recorder, **kwargs):
        seen.update(kwargs, tasks=tasks)
        return {}

    monkeypatch.setattr(accuracy, "evaluate_tasks", fake)
    run = _run(_runs(ladder_cli), 3)
    code, _, err = ladder_cli("eval", run["run_key"], "--tasks", "shakespeare_cloze",
                              "--num-fewshot", "5")
    assert code == 0, err
    assert seen == {"tasks": ("shakespeare_cloze",), "num_fewshot": 5, "allow_code_eval": False}
