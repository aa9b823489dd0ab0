"""`harness report`: the results table of a database, and the README/RESULTS blocks it fills."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import EvalSpec, RunSpec
from harness.errors import HarnessError
from harness.report import replace_report_blocks, report_blocks

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("shakespeare_cloze", "shakespeare_nextline")
QUICK = EvalSpec(seq_len=2048, max_tokens=16384, tasks=TASKS, limit=50)
ALL_TOKENS = EvalSpec(seq_len=2048, max_tokens=None, tasks=(), limit=None)


def _add(store, method, config, metrics, *, ev=QUICK, status="finished", seed=0):
    spec = RunSpec(model="tiny-llama", method=method, config=config, eval=ev, seed=seed)
    run = store.begin_run(spec)
    for name, value in metrics.items():
        task, _, metric = name.rpartition("/")
        store.add_metric(run.id, metric, value, task=task or None)
    if status != "running":
        store.end_run(run.id, status, error="boom" if status == "failed" else None, wall_s=1.0)


def _q(bits, fmt, steps=None, **extra):
    config = {"bits": bits, "fmt": fmt, "group_size": 64, **extra}
    if steps is not None:
        config["train"] = {"steps": steps, "lr": 1e-5}
    return config


@pytest.fixture
def ladder_db(store, db_url):
    """A ladder stored out of order, with one run of another protocol, a failed and a running
    run; PPLs chosen so that every PPL/FP is exact."""
    size = {"bits_per_weight": 3.5, "size_mb": 103.14}
    _add(store, "onebit", {"weight_bits": 1, "train": {"steps": 40}},
         {"ppl": 2400.0, "bits_per_weight": 1.0456, "size_mb": 70.57, "acc_avg": 0.1,
          "shakespeare_cloze/acc": 0.0, "shakespeare_cloze/acc_stderr": 0.0,
          "shakespeare_nextline/acc": 0.2, "shakespeare_nextline/acc_stderr": 0.0571})
    _add(store, "rtn", _q(2, "int"), {"ppl": 442000.0, "bits_per_weight": 2.28125})
    _add(store, "bitdistiller", _q(2, "int", steps=40), {"ppl": 1.0}, status="failed")
    _add(store, "qat", _q(2, "int", steps=40),
         {"ppl": 190.0, "bits_per_weight": 2.28125, "shakespeare_cloze/acc": 0.1})
    _add(store, "rtn", _q(3, "nf3"), {"ppl": 78.0, **size}, ev=ALL_TOKENS)
    _add(store, "absmax", _q(3, "int"), {"ppl": 90.0, **size})
    _add(store, "fp", {}, {"ppl": 40.0, "bits_per_weight": 16.0, "size_mb": 269.03,
                           "acc_avg": 0.29, "shakespeare_cloze/acc": 0.22,
                           "shakespeare_cloze/acc_stderr": 0.0592,
                           "shakespeare_nextline/acc": 0.36,
                           "shakespeare_nextline/acc_stderr": 0.0686,
                           "shakespeare_nextline/acc_norm": 0.56})
    _add(store, "bitdistiller", _q(3, "nf3", steps=40),
         {"ppl": 46.0, "ppl_ci95_low": 44.5, "ppl_ci95_high": 48.25, **size})
    _add(store, "clip", _q(3, "nf3"), {"ppl": 50.0, **size})
    _add(store, "clip", _q(3, "nf3"), {"ppl": 52.0, **size}, seed=1)  # a replicate
    _add(store, "rtn", _q(3, "nf3"), {"ppl": 80.0, **size})
    _add(store, "qat", _q(3, "nf3", steps=40), {"ppl": 9.0}, status="running")
    return db_url


EXPECTED = """\
| tokens/window | method | fmt | bits | group | PPL | PPL 95% CI | PPL/FP\
 | shakespeare_cloze acc | shakespeare_nextline acc | acc_avg | bits/weight | size MB\
 | train steps |
|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| 16,384/2048 | fp | - | - | - | 40.00 | - | 1.00 | 0.220 ± 0.059 | 0.360 ± 0.069 | 0.290\
 | 16.000 | 269.03 | - |
| 16,384/2048 | rtn | nf3 | 3 | 64 | 80.00 | - | 2.00 | - | - | - | 3.500 | 103.14 | - |
| 16,384/2048 | clip | nf3 | 3 | 64 | 51.00 ± 1.41 (n=2) | - | 1.27 | - | - | - | 3.500\
 | 103.14 | - |
| 16,384/2048 | bitdistiller | nf3 | 3 | 64 | 46.00 | 44.50-48.25 | 1.15 | - | - | - | 3.500\
 | 103.14 | 40 |
| 16,384/2048 | absmax | int | 3 | 64 | 90.00 | - | 2.25 | - | - | - | 3.500 | 103.14 | - |
| 16,384/2048 | rtn | int | 2 | 64 | 4.42e+05 | - | 11,050.00 | - | - | - | 2.281 | - | - |
| 16,384/2048 | qat | int | 2 | 64 | 190.00 | - | 4.75 | 0.100 | - | - | 2.281 | - | 40 |
| 16,384/2048 | onebit | - | 1 | - | 2,400.00 | - | 60.00 | 0.000 ± 0.000 | 0.200 ± 0.057\
 | 0.100 | 1.046 | 70.57 | 40 |
| all/2048 | rtn | nf3 | 3 | 64 | 78.00 | - | - | - | - | - | 3.500 | 103.14 | - |

PPL/FP divides by the fp run of the same model, window and token cap. PPL 95% CI: bootstrap \
over the evaluation windows ("-": stored without per-window results); accuracy ± lm-eval's \
standard error; replicates of one spec (seeds) show mean ± std (n).
PPL: first 16,384 held-out tokens, windows of 2048; accuracy: first 50 examples per task \
(profile quick).
PPL: all held-out tokens, windows of 2048 (profile quick).
"""


def test_report_markdown_table_of_a_known_database(cli, ladder_db):
    """Finished runs only, by protocol, bits (fp first), then the ladder's order with other
    methods after; PPL/FP against the fp run of the same protocol ("-" without one);
    acc ± stderr per task."""
    code, out, err = cli("report", "--markdown", "--db", ladder_db)
    assert (code, err) == (0, "")
    assert out == EXPECTED


def test_report_plain_text_and_method_filter(cli, ladder_db):
    code, out, _ = cli("report", "--db", ladder_db, "--methods", "clip,qat")
    assert code == 0
    lines = out.splitlines()
    # one protocol among the shown runs: no tokens/window column; only cloze has an acc
    assert lines[0].split() == ["method", "fmt", "bits", "group", "PPL", "PPL", "95%", "CI",
                                "PPL/FP", "shakespeare_cloze", "acc", "acc_avg", "bits/weight",
                                "size", "MB", "train", "steps"]
    assert set(lines[1]) == {"-", " "}
    # fp is not shown, but the ratios still divide by it; two clip seeds are one row
    assert [line.split() for line in lines[2:4]] == [
        ["clip", "nf3", "3", "64", "51.00", "±", "1.41", "(n=2)", "-", "1.27", "-", "-",
         "3.500", "103.14", "-"],
        ["qat", "int", "2", "64", "190.00", "-", "4.75", "0.100", "-", "2.281", "-", "40"]]
    assert lines[4].startswith("PPL/FP divides by the fp run of the same model, window and "
                               "token cap. PPL 95% CI: bootstrap over the evaluation windows")
    assert lines[5:] == ["PPL: first 16,384 held-out tokens, windows of 2048; accuracy: first "
                         "50 examples per task (profile quick)."]


def test_report_of_one_protocol_has_no_protocol_column(cli, store, db_url):
    _add(store, "fp", {}, {"ppl": 30.0}, ev=ALL_TOKENS)
    _add(store, "rtn", _q(2, "int"), {"ppl": 45.0}, ev=ALL_TOKENS)
    code, out, _ = cli("report", "--markdown", "--db", db_url)
    assert code == 0
    assert out.splitlines()[:4] == [
        "| method | fmt | bits | group | PPL | PPL 95% CI | PPL/FP | acc_avg | bits/weight "
        "| size MB | train steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| fp | - | - | - | 30.00 | - | 1.00 | - | - | - | - |",
        "| rtn | int | 2 | 64 | 45.00 | - | 1.50 | - | - | - | - |"]


def test_report_names_a_trained_runs_start(cli, store, db_url):
    _add(store, "fp", {}, {"ppl": 30.0})
    _add(store, "qat", _q(2, "int", steps=20), {"ppl": 60.0})
    _add(store, "qat", {**_q(2, "int", steps=20), "clip": False, "init": "gptq"}, {"ppl": 50.0})
    _add(store, "onebit", {"weight_bits": 1, "init": "svid"}, {"ppl": 900.0})
    code, out, _ = cli("report", "--markdown", "--db", db_url)
    assert code == 0
    rows = [line.split(" | ")[0].lstrip("| ") for line in out.splitlines()[2:6]]
    assert rows == ["fp", "qat", "qat (init=gptq)", "onebit"]


@pytest.mark.parametrize("argv,needle", [
    (["--db", "sqlite:///{tmp}/none.db"], "does not exist"),
    (["--db", "notaurl"], "not a SQLAlchemy URL"),
    (["--methods", "rtm"], "no finished rtm run"),
])
def test_report_bad_input_is_one_error_line_exit_2(cli, ladder_db, tmp_path, argv, needle):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--db" not in argv:
        argv += ["--db", ladder_db]
    code, out, err = cli("report", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err


def test_report_of_an_empty_database_says_so(cli, store, db_url):
    code, out, _ = cli("report", "--db", db_url)
    assert code == 0 and out.startswith("no finished runs in ")


def test_report_blocks_are_parsed_and_replaced():
    text = ("intro\n<!-- report: harness report --markdown --db 'sqlite:///a b.db' -->\n"
            "old table\n<!-- /report -->\nmiddle\n"
            "<!-- report: harness report --db sqlite:///c.db -->\n<!-- /report -->\nend\n")
    blocks = report_blocks(text)
    assert blocks == [(["report", "--markdown", "--db", "sqlite:///a b.db"], "old table\n"),
                      (["report", "--db", "sqlite:///c.db"], "")]
    new = replace_report_blocks(text, ["| new |\n", "second\n"])
    assert new == ("intro\n<!-- report: harness report --markdown --db 'sqlite:///a b.db' -->\n"
                   "| new |\n<!-- /report -->\nmiddle\n"
                   "<!-- report: harness report --db sqlite:///c.db -->\nsecond\n"
                   "<!-- /report -->\nend\n")
    assert [body for _, body in report_blocks(new)] == ["| new |\n", "second\n"]
    emptied = replace_report_blocks(new, ["", ""])
    assert [body for _, body in report_blocks(emptied)] == ["", ""]
    assert "-->\n<!-- /report -->\nmiddle" in emptied  # no blank line left in an empty block
    with pytest.raises(HarnessError, match="only `harness report"):
        report_blocks("<!-- report: harness run --methods rtn -->\n<!-- /report -->\n")


@pytest.mark.parametrize("doc", ["README.md", "docs/RESULTS.md"])
def test_generated_tables_in_the_docs_equal_their_commands_output(cli, monkeypatch, doc):
    """Each block between `<!-- report: harness report ... -->` and `<!-- /report -->` is the
    command's output on the committed database: a hand edit or a stale table fails here
    (scripts/update-report-tables regenerates them)."""
    monkeypatch.chdir(ROOT)  # the markers' sqlite:///docs/results/... paths are relative
    blocks = report_blocks((ROOT / doc).read_text())
    if doc == "README.md":
        assert any("docs/results/cpu-quick.db" in " ".join(argv) for argv, _ in blocks)
    for argv, body in blocks:
        code, out, err = cli(*argv)
        assert code == 0, err
        assert body == out, f"{doc}: the block of `harness {' '.join(argv)}` is stale"
    # reading left no journal files next to the committed databases
    assert not list((ROOT / "docs" / "results").glob("*.db-*"))
