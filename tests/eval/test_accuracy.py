"""Offline lm-eval tasks: data builder (harness/eval/task_data.py) and harness/eval/accuracy.py."""

import json
from pathlib import Path

import pytest

from harness import data
from harness.errors import HarnessError
from harness.eval import task_data
from harness.eval.accuracy import check_task_names, evaluate_tasks

TASKS = "shakespeare_cloze,shakespeare_nextline"


def test_split_last_word():
    assert task_data.split_last_word("Fair is foul, and foul is fair:") == (
        "Fair is foul, and foul is", "fair")
    assert task_data.split_last_word("  I thank you, gentlemen.--") == ("  I thank you,", "gentlemen")
    assert task_data.split_last_word("Upon the heath.") == ("Upon the", "heath")
    assert task_data.split_last_word("Where is it?") is None  # too short a word
    assert task_data.split_last_word("Hover o'er") is None  # fewer than three words
    assert task_data.split_last_word("and so is o'er") is None  # not alphabetic


def test_speaker_tags_and_directions_are_not_dialogue():
    assert not task_data.is_dialogue("FIRST WITCH.")
    assert not task_data.is_dialogue("Ham.", previous="")  # Hamlet's abbreviated tags
    assert not task_data.is_dialogue("[Enter three Witches.]")
    assert not task_data.is_dialogue("SCENE II. A Camp near Forres.")
    assert task_data.is_dialogue("When shall we three meet again?", previous="FIRST WITCH.")
    assert task_data.is_dialogue("Upon the heath.", previous="SECOND WITCH.")


@pytest.mark.parametrize("task", list(task_data.OFFLINE_TASKS))
def test_builder_is_deterministic_and_well_formed(task):
    a, b = task_data.build_docs(task), task_data.build_docs(task)
    assert a == b and 100 <= len(a) <= task_data.MAX_DOCS
    assert {d["play"] for d in a} == set(data.EVAL_PLAYS)
    for d in a:
        if task == "shakespeare_cloze":
            word = d["target"][1:]
            assert d["target"].startswith(" ") and word.isalpha() and len(word) >= 3
            assert not d["context"].endswith(" ")
        else:
            assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
            assert 0 <= d["label"] < 4 and d["context"].endswith("\n")
    if task == "shakespeare_nextline":  # the seeded label position is spread, not constant
        assert len({d["label"] for d in a}) == 4


def test_tasks_only_use_heldout_plays():
    """No document text comes from a training or calibration play."""
    other = [data.read_play(p) for p in data.plays("train") + data.plays("calibration")]
    other_lines = {ln.strip() for text in other for ln in text.split("\n") if len(ln.split()) >= 6}
    heldout = "\n".join(data.read_play(p) for p in data.EVAL_PLAYS)
    long = shared = 0
    for task in task_data.OFFLINE_TASKS:
        for d in task_data.build_docs(task):
            assert d["play"] in data.EVAL_PLAYS
            lines = d["context"].split("\n") + d.get("choices", [])
            for ln in lines:
                assert ln.strip() in heldout
                if len(ln.split()) >= 6:
                    long += 1
                    shared += ln.strip() in other_lines
    # Only lines Shakespeare himself repeats ("For the rain it raineth every day." is in both
    # Twelfth Night and Lear) may also occur in a training play: measured 16 of 15,440.
    assert shared / long < 0.005


def test_tasks_dir_is_built_once_with_loadable_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    out = task_data.tasks_dir()
    assert out == tmp_path / "tasks" / f"v{task_data.TASK_DATA_VERSION}"
    for task in task_data.OFFLINE_TASKS:
        yaml_text = (out / f"{task}.yaml").read_text()
        assert str(out / f"{task}.jsonl") in yaml_text and task_data.DATA_DIR_TOKEN not in yaml_text
        rows = [json.loads(x) for x in (out / f"{task}.jsonl").read_text().splitlines()]
        assert rows == json.loads(json.dumps(task_data.build_docs(task)))
    stamp = (out / "shakespeare_cloze.jsonl").stat().st_mtime_ns
    assert task_data.tasks_dir() == out
    assert (out / "shakespeare_cloze.jsonl").stat().st_mtime_ns == stamp  # not rebuilt


def test_unknown_task_is_one_line_listing_offline_tasks():
    with pytest.raises(HarnessError) as err:
        check_task_names(("shakespeare_clozee",))
    msg = str(err.value)
    assert "did you mean 'shakespeare_cloze'" in msg and "shakespeare_nextline" in msg
    assert "\n" not in msg
    assert check_task_names(("piqa", "shakespeare_cloze")) == ("piqa", "shakespeare_cloze")


def test_evaluate_tasks_on_tiny_records_metrics(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's git lookup is skipped

    class Rec:
        rows = []

        def metric(self, name, value, task=None, **extra):
            self.rows.append((name, task, value))

    model, tok = tiny
    rec = Rec()
    out = evaluate_tasks(model, tok, TASKS.split(","), 4, rec)
    assert {"shakespeare_cloze/acc", "shakespeare_nextline/acc", "shakespeare_nextline/acc_norm",
            "acc_avg"} <= set(out)
    assert ("acc", "shakespeare_nextline") in {(n, t) for n, t, _ in rec.rows}
    assert all(0.0 <= out[k] <= 1.0 for k in out if k.endswith(("/acc", "/acc_norm", "acc_avg")))
    assert "not a git repository" not in capfd.readouterr().err


def test_cli_run_with_tasks_stores_task_metrics(cli, db_url, tmp_path):
    code, out, err = cli("run", "--methods", "rtn", "--bits", "3", "--model", "tiny-llama",
                         "--max-eval-tokens", "512", "--seq-len", "256", "--tasks", TASKS,
                         "--limit", "5", "--db", db_url, "--output-dir", tmp_path / "runs")
    assert code == 0, err
    from harness.store import Store

    store = Store(db_url)
    runs = store.runs()
    assert sorted(r.method for r in runs) == ["fp", "rtn"]
    for run in runs:
        rows = {(m.task, m.name): m.value for m in store.metrics(run.id)}
        for key in [("shakespeare_cloze", "acc"), ("shakespeare_nextline", "acc"),
                    ("shakespeare_nextline", "acc_norm"), ("", "acc_avg")]:
            assert 0.0 <= rows[key] <= 1.0, (key, rows)


def test_cli_bad_task_is_exit_2_one_line(cli, db_url):
    code, out, err = cli("run", "--methods", "rtn", "--model", "tiny-llama", "--tasks",
                         "shakespeare_nope", "--db", db_url)
    assert code == 2
    assert err.startswith("error: ") and "shakespeare_cloze" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_uncached_standard_suite_fails_before_any_run(cli, db_url, tmp_path, monkeypatch):
    """Checked once up front (it used to surface after every run's PPL, as failed runs)."""
    from harness.eval import accuracy

    def offline(task_manager, names):
        assert "piqa" in names
        raise HarnessError("task 'piqa': its dataset is not available offline (...)")

    monkeypatch.setattr(accuracy, "_task_manager", lambda names: object())  # no indexing
    monkeypatch.setattr(accuracy, "_load_checked", offline)
    code, _, err = cli("run", "--methods", "rtn", "--model", "tiny-llama", "--tasks",
                       "shakespeare_cloze,piqa", "--db", db_url, "--output-dir", tmp_path / "r")
    assert code == 2 and "not available offline" in err and "Traceback" not in err
    assert not Path(db_url.removeprefix("sqlite:///")).exists()  # no run row, no database


def test_standard_suite_without_cached_data_names_the_fix():
    from harness.eval.accuracy import _load_checked

    class Offline:
        def load(self, names):
            raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (OfflineModeIsEnabled)")

    with pytest.raises(HarnessError) as err:
        _load_checked(Offline(), ("shakespeare_cloze", "piqa"))
    msg = str(err.value)
    assert "'piqa'" in msg and "baber/piqa" in msg and "HF_DATASETS_CACHE" in msg
    assert "\n" not in msg
