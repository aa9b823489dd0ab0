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

        def series(self, name, values, task=None):
            self.rows.append((name, task, list(values)))

    model, tok = tiny
    rec = Rec()
    out = evaluate_tasks(model, tok, TASKS.split(","), 4, rec)
    assert {"shakespeare_cloze/acc", "shakespeare_nextline/acc", "shakespeare_nextline/acc_norm",
            "acc_avg"} <= set(out)
    assert ("acc", "shakespeare_nextline") in {(n, t) for n, t, _ in rec.rows}
    assert all(0.0 <= out[k] <= 1.0 for k in out if k.endswith(("/acc", "/acc_norm", "acc_avg")))
    assert "not a git repository" not in capfd.readouterr().err


# A character-level model that "knows" a table: after each three-character window it puts logit
# 32 on the character the table gives (a space for windows it does not know) and 0 elsewhere. In
# float32 log_softmax of such a row is exactly 0 and -32 (exp(-32) * 80 vanishes next to 1), so a
# continuation's log-likelihood is exactly -32 x its mispredicted characters, and it is lm-eval's
# greedy continuation iff nothing is mispredicted: every outcome follows from the documents.
WINDOW, PEAK, DEFAULT = 3, 32.0, " "


def _char_lm(alphabet: str, table: dict[str, str]):
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
    from transformers.modeling_outputs import CausalLMOutput

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    chars = {i: c for c, i in vocab.items()}

    class Config(PretrainedConfig):
        model_type = "window_table_lm"

    class WindowTableLM(PreTrainedModel):
        config_class = Config

        def __init__(self):
            super().__init__(Config())
            self.peak = torch.nn.Parameter(torch.tensor(PEAK))  # evaluate_tasks reads a device

        def forward(self, input_ids, **_):
            rows = [[chars[i] for i in row] for row in input_ids.tolist()]
            nxt = [[vocab[table.get("".join(r[max(0, j - WINDOW + 1):j + 1]), DEFAULT)]
                    for j in range(len(r))] for r in rows]
            hot = torch.nn.functional.one_hot(torch.tensor(nxt), len(vocab)).float()
            return CausalLMOutput(logits=hot * self.peak)

    return WindowTableLM(), tok


def _misses(table: dict[str, str], context: str, continuation: str) -> int:
    """Characters of ``continuation`` the table mispredicts. lm-eval moves the context's trailing
    whitespace into the continuation (the nextline contexts end in a newline): scored too."""
    text, start = context + continuation, len(context.rstrip())
    return sum(text[j] != table.get(text[max(0, j - WINDOW):j], DEFAULT)
               for j in range(start, len(text)))


def _teach(table: dict[str, str], context: str, continuation: str) -> None:
    """Makes the table predict every scored character of ``continuation`` after ``context``
    (later lessons overwrite earlier ones where windows coincide)."""
    text = context + continuation
    for j in range(len(context.rstrip()), len(text)):
        table[text[max(0, j - WINDOW):j]] = text[j]


def test_evaluate_tasks_scores_a_known_model_exactly():
    import math
    from fractions import Fraction

    folder = task_data.tasks_dir()
    n = 10
    docs = {t: [json.loads(x) for x in (folder / f"{t}.jsonl").read_text().splitlines()[:n]]
            for t in task_data.OFFLINE_TASKS}
    cloze, nextline = docs["shakespeare_cloze"], docs["shakespeare_nextline"]
    table: dict[str, str] = {}
    for i in (3, 5, 9):
        _teach(table, cloze[i]["context"], cloze[i]["target"])
    _teach(table, nextline[0]["context"], nextline[0]["choices"][nextline[0]["label"]])

    # lm-eval: cloze acc = greedy; multiple choice predicts the first argmax of the
    # log-likelihoods (acc) and of log-likelihood / characters of the choice (acc_norm).
    cloze_hits = [_misses(table, d["context"], d["target"]) == 0 for d in cloze]
    acc, acc_norm = [], []
    for d in nextline:
        miss = [_misses(table, d["context"], c) for c in d["choices"]]
        acc.append(min(range(4), key=lambda i: miss[i]) == d["label"])
        acc_norm.append(min(range(4), key=lambda i: Fraction(miss[i], len(d["choices"][i])))
                        == d["label"])
    # The design: exactly the taught cloze docs are greedy, and the three scores all differ
    # (no 0 or 1, no stderr of 0), so a score recorded under another name cannot pass.
    assert [i for i, hit in enumerate(cloze_hits) if hit] == [3, 5, 9]
    assert (sum(cloze_hits), sum(acc), sum(acc_norm)) == (3, 4, 2)

    def stderr(k):  # lm-eval's mean_stderr: sample standard deviation / sqrt(n)
        return math.sqrt(k / n * (1 - k / n) / (n - 1))

    class Rec:
        rows = []

        def metric(self, name, value, task=None, **extra):
            self.rows.append((name, task, value))

        def series(self, name, values, task=None):
            self.rows.append((name, task, list(values)))

    alphabet = "".join(sorted({c for ds in docs.values() for d in ds
                               for c in d["context"] + d.get("target", "")
                               + "".join(d.get("choices", []))}))
    model, tok = _char_lm(alphabet, table)
    rec = Rec()
    out = evaluate_tasks(model, tok, TASKS.split(","), n, rec)
    expected = {"shakespeare_cloze/acc": sum(cloze_hits) / n,
                "shakespeare_nextline/acc": sum(acc) / n,
                "shakespeare_nextline/acc_norm": sum(acc_norm) / n,
                "acc_avg": (sum(cloze_hits) / n + sum(acc) / n) / 2}
    assert {k: out[k] for k in expected} == expected
    assert out["shakespeare_cloze/acc_stderr"] == pytest.approx(stderr(sum(cloze_hits)), rel=1e-12)
    assert out["shakespeare_nextline/acc_stderr"] == pytest.approx(stderr(sum(acc)), rel=1e-12)
    assert out["shakespeare_nextline/acc_norm_stderr"] == pytest.approx(stderr(sum(acc_norm)),
                                                                        rel=1e-12)
    recorded = {(name, task): value for name, task, value in rec.rows}
    assert recorded[("acc", "shakespeare_nextline")] == expected["shakespeare_nextline/acc"]
    assert recorded[("acc_norm", "shakespeare_nextline")] == \
        expected["shakespeare_nextline/acc_norm"]
    assert recorded[("acc_avg", None)] == expected["acc_avg"]
    # each document's own outcome, in document order: what paired comparisons are made from
    assert recorded[("correct", "shakespeare_cloze")] == [float(h) for h in cloze_hits]
    assert recorded[("correct", "shakespeare_nextline")] == [float(a) for a in acc]
    assert out["acc_avg_stderr"] == pytest.approx(
        math.sqrt(stderr(sum(cloze_hits)) ** 2 + stderr(sum(acc)) ** 2) / 2, rel=1e-12)


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


def _uncached_arc_easy(tmp_path, monkeypatch):
    """A task manager holding lm-eval's own arc_easy config, with an empty datasets cache and
    offline mode on: what a user without that dataset cached has."""
    import shutil

    import datasets
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    (tmp_path / "tasks").mkdir()
    shutil.copy(Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml", tmp_path / "tasks")
    return TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)


def test_real_uncached_standard_suite_is_the_one_line_error(tmp_path, monkeypatch):
    from harness.eval.accuracy import _load_checked

    with pytest.raises(HarnessError) as err:
        _load_checked(_uncached_arc_easy(tmp_path, monkeypatch), ("shakespeare_cloze", "arc_easy"))
    msg = str(err.value)
    assert "'arc_easy': its dataset is not available offline" in msg and "allenai/ai2_arc" in msg
    assert "\n" not in msg


def _missing_data_errors():
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return [DatasetNotFoundError("Dataset 'baber/piqa' doesn't exist on the Hub"),
            DataFilesNotFoundError("No (supported) data files found in baber/piqa"),
            OfflineModeIsEnabled("Offline mode is enabled."),
            LocalEntryNotFoundError("baber/piqa is not cached"),
            FileNotFoundError("Couldn't find any data file at baber/piqa")]


@pytest.mark.parametrize("exc", _missing_data_errors(), ids=lambda e: type(e).__name__)
def test_each_missing_dataset_error_is_the_one_line_error(exc):
    from harness.eval.accuracy import _load_checked

    class Missing:
        def load(self, names):
            raise exc

    with pytest.raises(HarnessError, match="'piqa': its dataset is not available offline"):
        _load_checked(Missing(), ("piqa",))


@pytest.mark.parametrize("exc", [KeyError("doc_to_text"), TypeError("bad template"),
                                 ValueError("bad split"), PermissionError("cache is read-only")])
def test_a_bug_loading_a_standard_suite_surfaces_as_itself(tmp_path, monkeypatch, exc):
    """Only a missing dataset becomes "not available offline"; a bug keeps its own type."""
    from lm_eval.tasks import TaskManager

    from harness.eval.accuracy import _load_checked

    def broken(self, names):
        raise exc

    monkeypatch.setattr(TaskManager, "load", broken)
    with pytest.raises(type(exc)) as err:
        _load_checked(_uncached_arc_easy(tmp_path, monkeypatch), ("arc_easy",))
    assert err.value is exc
