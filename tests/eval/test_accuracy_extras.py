"""harness/eval/accuracy.py: gsm8k / humaneval metrics, per-example "correct" series,
acc_avg_stderr, num_fewshot and the code-execution gate.

The results dicts below copy the shape lm-eval 0.4.13's ``simple_evaluate(log_samples=True)``
returns (keys "<metric>,<filter>", "n-shot", "n-samples", "group_subtasks", and "samples" with
one entry per document and filter, carrying the metric values as keys); measured on local
copies of its gsm8k and humaneval YAMLs.
"""

import math
import os

import pytest

from harness.errors import HarnessError
from harness.eval import accuracy
from harness.eval.accuracy import _record, check_task_data, check_task_names, evaluate_tasks
from harness.orchestration.recorders import BufferRecorder

TASKS = ("shakespeare_cloze", "shakespeare_nextline")


def _sample(doc_id, filter_key, **metrics):
    return {"doc_id": doc_id, "doc": {}, "target": "", "arguments": [], "resps": [],
            "filtered_resps": [], "filter": filter_key, "metrics": list(metrics),
            "doc_hash": "", "prompt_hash": "", "target_hash": "", **metrics}


def _gsm8k():
    # strict and flexible disagree on doc 2 (an answer without "#### "), and lm-eval logs the
    # strict pass first, then the flexible one; docs deliberately out of order within each.
    strict = {0: 1.0, 1: 0.0, 2: 0.0, 3: 1.0}
    flexible = {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    order = [2, 0, 3, 1]
    return {
        "results": {"gsm8k": {"name": "gsm8k", "alias": "gsm8k", "sample_len": 4,
                              "exact_match,strict-match": 0.5,
                              "exact_match_stderr,strict-match": 0.2886751345948129,
                              "exact_match,flexible-extract": 0.75,
                              "exact_match_stderr,flexible-extract": 0.25}},
        "group_subtasks": {},
        "n-shot": {"gsm8k": 5},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 4}},
        "samples": {"gsm8k": [_sample(d, "strict-match", exact_match=strict[d]) for d in order]
                    + [_sample(d, "flexible-extract", exact_match=flexible[d]) for d in order]},
    }


def _humaneval():
    passed = {0: 1.0, 1: 1.0, 2: 0.0}
    return {
        "results": {"humaneval": {"name": "humaneval", "alias": "humaneval", "sample_len": 3,
                                  "pass@1,create_test": 2 / 3,
                                  "pass@1_stderr,create_test": 0.3333333333333333}},
        "group_subtasks": {},
        "n-shot": {"humaneval": 0},
        "n-samples": {"humaneval": {"original": 164, "effective": 3}},
        "samples": {"humaneval": [_sample(d, "create_test", **{"pass@1": passed[d]})
                                  for d in (1, 2, 0)]},
    }


def _arc_easy():
    acc = {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}
    acc_norm = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}
    return {
        "results": {"arc_easy": {"name": "arc_easy", "alias": "arc_easy", "sample_len": 5,
                                 "acc,none": 0.6, "acc_stderr,none": 0.2449489742783178,
                                 "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.2449489742783178}},
        "group_subtasks": {},
        "n-shot": {"arc_easy": 0},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 5}},
        "samples": {"arc_easy": [_sample(d, "none", acc=acc[d], acc_norm=acc_norm[d])
                                 for d in (4, 1, 3, 0, 2)]},
    }


def _merge(*parts):
    out = {"results": {}, "group_subtasks": {}, "n-shot": {}, "n-samples": {}, "samples": {}}
    for part in parts:
        for key in out:
            out[key].update(part.get(key, {}))
    return out


def _metrics(rec):
    return {(kw["task"], kw["name"]): kw["value"] for kind, kw in rec.records if kind == "metric"}


def _extras(rec):
    return {(kw["task"], kw["name"]): kw["extra"] for kind, kw in rec.records if kind == "metric"}


def _series(rec):
    return {(kw["task"], kw["name"]): kw["values"] for kind, kw in rec.records if kind == "series"}


def test_gsm8k_records_both_filters_and_the_strict_series():
    rec = BufferRecorder()
    out = _record(_gsm8k(), ("gsm8k",), 4, 1.0, rec)
    m = _metrics(rec)
    assert m[("gsm8k", "exact_match_strict")] == 0.5
    assert m[("gsm8k", "exact_match_strict_stderr")] == pytest.approx(0.2886751345948129)
    assert m[("gsm8k", "exact_match_flexible")] == 0.75
    assert m[("gsm8k", "exact_match_flexible_stderr")] == 0.25
    assert m[("gsm8k", "n_examples")] == 4
    assert out["acc_avg"] == 0.5  # the strict one is the headline, not flexible's 0.75
    assert _series(rec) == {("gsm8k", "correct"): [1.0, 0.0, 0.0, 1.0]}  # strict, doc order
    assert _extras(rec)[("gsm8k", "exact_match_strict")] == {"limit": 4, "n": 4,
                                                             "num_fewshot": 5}


def test_humaneval_records_pass_at_1_and_its_series():
    rec = BufferRecorder()
    out = _record(_humaneval(), ("humaneval",), None, 1.0, rec)
    assert out["humaneval/pass_at_1"] == pytest.approx(2 / 3)
    assert out["humaneval/pass_at_1_stderr"] == pytest.approx(1 / 3)
    assert out["acc_avg"] == pytest.approx(2 / 3)
    assert _series(rec) == {("humaneval", "correct"): [1.0, 1.0, 0.0]}
    assert _extras(rec)[("humaneval", "pass_at_1")]["num_fewshot"] == 0


def test_multiple_choice_series_is_acc_in_doc_order_and_keys_are_unchanged():
    rec = BufferRecorder()
    out = _record(_arc_easy(), ("arc_easy",), 5, 2.0, rec)
    assert {k: out[k] for k in ("arc_easy/acc", "arc_easy/acc_norm", "acc_avg",
                                "tasks_seconds")} == {"arc_easy/acc": 0.6,
                                                      "arc_easy/acc_norm": 0.4,
                                                      "acc_avg": 0.6, "tasks_seconds": 2.0}
    assert {"arc_easy/acc_stderr", "arc_easy/acc_norm_stderr"} <= set(out)
    series = _series(rec)
    assert series == {("arc_easy", "correct"): [0.0, 1.0, 1.0, 0.0, 1.0]}  # acc, not acc_norm
    assert sum(series[("arc_easy", "correct")]) / 5 == out["arc_easy/acc"]


def test_group_records_a_series_per_subtask_and_the_headline_from_the_group():
    leaves = {"mmlu_anatomy": [1.0, 0.0, 1.0], "mmlu_astronomy": [0.0, 0.0],
              "mmlu_marketing": [1.0, 1.0, 1.0, 0.0]}
    results = {
        "results": {"mmlu": {"acc,none": 0.5555, "acc_stderr,none": 0.17},
                    "mmlu_stem": {"acc,none": 0.4}, "mmlu_other": {"acc,none": 0.75},
                    **{leaf: {"acc,none": sum(v) / len(v)} for leaf, v in leaves.items()}},
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"],
                           "mmlu_stem": ["mmlu_anatomy", "mmlu_astronomy"],
                           "mmlu_other": ["mmlu_marketing"]},
        "n-shot": {"mmlu": 5},
        "n-samples": {leaf: {"original": 100, "effective": len(v)} for leaf, v in leaves.items()},
        "samples": {leaf: [_sample(i, "none", acc=x) for i, x in reversed(list(enumerate(v)))]
                    for leaf, v in leaves.items()},
    }
    rec = BufferRecorder()
    out = _record(results, ("mmlu",), None, 1.0, rec, num_fewshot=5)
    assert out["mmlu/acc"] == 0.5555 and out["acc_avg"] == 0.5555
    assert _series(rec) == {(leaf, "correct"): v for leaf, v in leaves.items()}
    assert _metrics(rec)[("mmlu", "n_examples")] == 9
    assert _extras(rec)[("mmlu", "acc")] == {"limit": None, "n": 9, "num_fewshot": 5}
    # only the requested task gets metrics; subtasks only their series
    assert {t for t, _ in _metrics(rec)} == {"mmlu", None}


def test_acc_avg_stderr_is_the_stderr_of_the_mean_of_independent_tasks():
    rec = BufferRecorder()
    out = _record(_merge(_gsm8k(), _humaneval(), _arc_easy()),
                  ("gsm8k", "humaneval", "arc_easy"), None, 1.0, rec)
    s = (0.2886751345948129, 0.3333333333333333, 0.2449489742783178)
    expected = math.sqrt(sum(x * x for x in s)) / 3
    assert out["acc_avg"] == pytest.approx((0.5 + 2 / 3 + 0.6) / 3)
    assert out["acc_avg_stderr"] == pytest.approx(expected, rel=1e-12)
    assert _metrics(rec)[(None, "acc_avg_stderr")] == pytest.approx(expected, rel=1e-12)
    assert set(_series(rec)) == {("gsm8k", "correct"), ("humaneval", "correct"),
                                 ("arc_easy", "correct")}


def test_acc_avg_stderr_is_left_out_when_a_task_has_none():
    results = _merge(_gsm8k(), _arc_easy())
    # lm-eval writes "N/A" for a stderr it could not compute (a single example)
    results["results"]["arc_easy"]["acc_stderr,none"] = "N/A"
    rec = BufferRecorder()
    out = _record(results, ("gsm8k", "arc_easy"), 1, 1.0, rec)
    assert "acc_avg" in out and "acc_avg_stderr" not in out
    assert (None, "acc_avg_stderr") not in _metrics(rec)
    # only acc_norm's stderr (not the headline's) remains: still not enough
    assert "arc_easy/acc_norm_stderr" in out and "arc_easy/acc_stderr" not in out


def test_humaneval_is_refused_without_allow_code_eval():
    with pytest.raises(HarnessError) as err:
        check_task_names(("arc_easy", "humaneval"))
    msg = str(err.value)
    assert "'humaneval'" in msg and "--allow-code-eval" in msg and "generated code" in msg
    assert "\n" not in msg
    assert check_task_names(("humaneval", "gsm8k"), allow_code_eval=True) == ("humaneval",
                                                                              "gsm8k")
    assert check_task_names(("gsm8k",)) == ("gsm8k",)  # generates, but runs no code


def test_evaluate_tasks_refuses_humaneval_before_any_model_work(monkeypatch):
    def never(**kwargs):
        raise AssertionError("simple_evaluate ran")

    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", never)
    with pytest.raises(HarnessError, match="--allow-code-eval"):
        evaluate_tasks(None, None, ["humaneval"], 1, BufferRecorder())


class _FakeLM:
    def __init__(self, **kwargs):
        pass


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """simple_evaluate replaced by one that captures its keyword arguments (and the code-eval
    permission in the environment at call time) and returns ``fake_lm_eval.results``."""
    import lm_eval
    import lm_eval.models.huggingface

    class Fake:
        results = _arc_easy()
        calls = []

        @classmethod
        def simple_evaluate(cls, **kwargs):
            cls.calls.append((kwargs, os.environ.get("HF_ALLOW_CODE_EVAL")))
            return cls.results

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    monkeypatch.setattr(lm_eval, "simple_evaluate", Fake.simple_evaluate)
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", _FakeLM)
    monkeypatch.setattr(accuracy, "_task_manager", lambda names: object())
    monkeypatch.setattr(accuracy, "_load_checked", lambda tm, names: None)
    return Fake


def test_num_fewshot_reaches_simple_evaluate_and_the_metric_extra(tiny, fake_lm_eval):
    model, tok = tiny
    fake_lm_eval.results = {**_arc_easy(), "n-shot": {}}  # fall back to the request
    rec = BufferRecorder()
    evaluate_tasks(model, tok, ["arc_easy"], 5, rec, num_fewshot=3)
    (kwargs, allowed), = fake_lm_eval.calls
    assert kwargs["num_fewshot"] == 3 and kwargs["log_samples"] is True
    assert kwargs["confirm_run_unsafe_code"] is False and allowed is None
    assert _extras(rec)[("arc_easy", "acc")]["num_fewshot"] == 3
    assert _series(rec)[("arc_easy", "correct")] == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_allowed_humaneval_confirms_unsafe_code_only_during_the_run(tiny, fake_lm_eval):
    model, tok = tiny
    fake_lm_eval.results = _humaneval()
    out = evaluate_tasks(model, tok, ["humaneval"], 3, BufferRecorder(), allow_code_eval=True)
    (kwargs, allowed), = fake_lm_eval.calls
    assert kwargs["confirm_run_unsafe_code"] is True and allowed == "1"
    assert kwargs["num_fewshot"] is None
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # the permission ended with the evaluation
    assert out["humaneval/pass_at_1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_num_fewshot_is_one_line(bad):
    with pytest.raises(HarnessError) as err:
        evaluate_tasks(None, None, ["arc_easy"], 1, BufferRecorder(), num_fewshot=bad)
    assert "num_fewshot" in str(err.value) and "\n" not in str(err.value)


def test_check_task_data_loads_humaneval_with_code_eval_permitted(monkeypatch):
    """lm-eval's humaneval module runs code_eval's fixed self-test on load, which HF evaluate
    refuses without HF_ALLOW_CODE_EVAL=1; permission for model output is asked elsewhere."""
    seen = []
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    monkeypatch.setattr(accuracy, "_task_manager", lambda names: object())
    monkeypatch.setattr(accuracy, "_load_checked",
                        lambda tm, names: seen.append((names, os.environ.get("HF_ALLOW_CODE_EVAL"))))
    check_task_data(["humaneval"])
    check_task_data(["gsm8k"])
    assert seen == [(("humaneval",), "1"), (("gsm8k",), None)]
    assert "HF_ALLOW_CODE_EVAL" not in os.environ


def test_real_run_records_a_correct_series_matching_acc(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = tiny
    rec = BufferRecorder()
    out = evaluate_tasks(model, tok, list(TASKS), 6, rec, num_fewshot=1)
    series = _series(rec)
    assert set(series) == {(t, "correct") for t in TASKS}
    for task in TASKS:
        values = series[(task, "correct")]
        assert len(values) == 6 and set(values) <= {0.0, 1.0}
        assert sum(values) / len(values) == pytest.approx(out[f"{task}/acc"], abs=1e-12)
        assert _metrics(rec)[(task, "n_examples")] == 6
        assert _extras(rec)[(task, "acc")]["num_fewshot"] == 1  # lm-eval's n-shot
    stderrs = [out[f"{t}/acc_stderr"] for t in TASKS]
    assert out["acc_avg_stderr"] == pytest.approx(math.sqrt(sum(s * s for s in stderrs)) / 2)
