"""Accuracy through lm-eval on the in-memory (possibly quantized) model.

``evaluate_tasks`` wraps the model in lm-eval's ``HFLM`` (which only calls the model's
``forward``, so ``QuantLinear`` / ``OneBitLinear`` layers need nothing special) and runs
``lm_eval.simple_evaluate`` with a ``TaskManager`` that also sees the harness's offline tasks
(built from the held-out plays, see :mod:`harness.eval.task_data`). Everything runs offline:
a standard suite whose data is not in the local Hugging Face cache is a one-line error.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
import os
import time

from harness.errors import HarnessError
from harness.eval.hf_offline import MISSING_DATA_ERRORS, offline_env
from harness.eval.task_data import OFFLINE_TASKS, tasks_dir

# Accepted by name; they need their Hugging Face dataset in the local cache (no network here).
STANDARD_TASKS = ("arc_challenge", "arc_easy", "piqa", "hellaswag", "winogrande", "boolq",
                  "mmlu", "lambada_openai", "gsm8k", "humaneval")
# Tasks whose scoring executes the model's completions (lm-eval marks them ``unsafe_code``).
CODE_EVAL_TASKS = ("humaneval",)
# What we record per task, as (lm-eval metric, lm-eval filter, recorded name), the stderr of
# each where computed; the first one present is the task's headline (averaged into acc_avg and
# scored per example in the "correct" series). Keys as lm-eval 0.4.13 reports them: gsm8k's
# "exact_match,strict-match" / "exact_match,flexible-extract", humaneval's "pass@1,create_test".
METRICS = (("acc", "none", "acc"), ("acc_norm", "none", "acc_norm"))
TASK_METRICS = {
    "gsm8k": (("exact_match", "strict-match", "exact_match_strict"),
              ("exact_match", "flexible-extract", "exact_match_flexible")),
    "humaneval": (("pass@1", "create_test", "pass_at_1"),),
}
# Bootstrap is only used for non-mean aggregations; acc/acc_norm stderr is analytic (cheap).
BOOTSTRAP_ITERS = 100
def _offline_env() -> None:
    offline_env()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def available_tasks() -> list[str]:
    return [*OFFLINE_TASKS, *STANDARD_TASKS]


def check_task_names(tasks, allow_code_eval: bool = False) -> tuple[str, ...]:
    """Validates names before any model work.

    Args:
        tasks: task names.
        allow_code_eval: permits tasks that execute the model's generated code (humaneval).

    Raises:
        HarnessError: a name that is neither an offline task nor a supported standard suite,
            or a code-executing task without ``allow_code_eval``.
    """
    names = tuple(t.strip() for t in tasks if t and t.strip())
    if not names:
        raise HarnessError(f"no tasks given; use some of: {', '.join(available_tasks())}")
    for name in names:
        if name not in OFFLINE_TASKS and name not in STANDARD_TASKS:
            close = difflib.get_close_matches(name, available_tasks(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HarnessError(
                f"unknown task {name!r}{hint}; offline tasks: {', '.join(OFFLINE_TASKS)}; "
                f"standard suites (need their data cached): {', '.join(STANDARD_TASKS)}"
            )
        if name in CODE_EVAL_TASKS and not allow_code_eval:
            raise HarnessError(
                f"task {name!r} scores by running the model's generated code on this machine "
                f"(unsandboxed); add --allow-code-eval to permit it, or drop {name!r}"
            )
    return names


@contextlib.contextmanager
def _code_eval_env(enabled: bool):
    """HF ``evaluate``'s code_eval refuses to run unless HF_ALLOW_CODE_EVAL=1, and lm-eval's
    humaneval already calls it when its task module is loaded (a fixed self-test). Scoped, so
    the permission does not outlive the evaluation that was granted it."""
    if not enabled:
        yield
        return
    old = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = old


def _quiet_loggers():
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _task_manager(names: tuple[str, ...]):
    from lm_eval.tasks import TaskManager  # lm-eval is heavy and optional: only for --tasks

    # Indexing lm-eval's thousands of built-in YAMLs takes seconds: only when a suite needs it.
    standard = any(n not in OFFLINE_TASKS for n in names)
    return TaskManager(include_path=str(tasks_dir()), include_defaults=standard)


def _load_checked(task_manager, names: tuple[str, ...]) -> None:
    """Loads each standard suite once so a missing dataset fails here, naming it."""
    for name in names:
        if name in OFFLINE_TASKS:
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                task_manager.load([name])
        except MISSING_DATA_ERRORS as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise HarnessError(
                f"task {name!r}: its dataset is not available offline ({first}); run it once "
                f"with network access (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to fill the cache, "
                f"or point HF_DATASETS_CACHE / HF_HOME at a cache that holds it"
            ) from None


def check_task_data(tasks) -> None:
    """Fails before any run when a requested standard suite's dataset is not cached (offline
    tasks always are); without standard suites it costs nothing. Whether code-executing tasks
    are permitted is :func:`check_task_names`' question (asked when the runs are planned, and
    again by :func:`evaluate_tasks`): loading humaneval here runs only lm-eval's fixed
    self-test, never model output.

    Raises:
        HarnessError: as :func:`check_task_names`, or a suite whose data is missing.
    """
    names = check_task_names(tasks, allow_code_eval=True)
    if all(n in OFFLINE_TASKS for n in names):
        return
    _offline_env()
    _quiet_loggers()
    with contextlib.redirect_stderr(io.StringIO()):
        task_manager = _task_manager(names)
    with _code_eval_env(any(n in CODE_EVAL_TASKS for n in names)):
        _load_checked(task_manager, names)


def evaluate_tasks(model, tokenizer, tasks, limit: int | None, recorder,
                   batch_size: int | None = None, verbose: bool = False,
                   num_fewshot: int | None = None,
                   allow_code_eval: bool = False) -> dict[str, float]:
    """Runs lm-eval ``tasks`` on ``model`` and records per-task metrics.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``; quantized layers are fine).
        tokenizer: its tokenizer.
        tasks: task names (offline ``shakespeare_*`` tasks or standard suites).
        limit: first ``limit`` examples of each task (None = all).
        recorder: gets ``metric(name, value, task=...)`` per task, ``acc_avg`` (and
            ``acc_avg_stderr``) overall, and ``series("correct", values, task=...)``: each
            evaluated example's headline score in doc_id order, per subtask for groups (mmlu).
        batch_size: lm-eval batch size (default 16 on CUDA, 8 on CPU).
        verbose: keep lm-eval's logging and stderr output.
        num_fewshot: few-shot examples per prompt (None = each task's default, e.g. 5 for
            gsm8k, 0 for the others); lm-eval keeps 0 for tasks that pin it (humaneval).
        allow_code_eval: permits humaneval, whose scoring executes the model's completions.

    Returns:
        ``{"<task>/acc": x, "<task>/acc_stderr": s, "<task>/acc_norm": y, ..., "acc_avg": a,
        "acc_avg_stderr": e}`` (gsm8k: ``exact_match_strict`` / ``exact_match_flexible``,
        humaneval: ``pass_at_1``, each with ``_stderr``).

    Raises:
        HarnessError: unknown task name, humaneval without ``allow_code_eval``, a negative
            ``num_fewshot``, or a standard suite whose data is not cached.
    """
    names = check_task_names(tasks, allow_code_eval=allow_code_eval)
    if num_fewshot is not None and (isinstance(num_fewshot, bool)
                                    or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise HarnessError(f"num_fewshot {num_fewshot!r}: must be a whole number >= 0 "
                           f"(--num-fewshot 0 for zero-shot, or leave it out for each task's "
                           f"default)")
    _offline_env()
    if not verbose:
        _quiet_loggers()
    try:  # lm-eval is heavy and optional: imported only when tasks run
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ModuleNotFoundError as exc:
        raise HarnessError(f"accuracy tasks need lm-eval ({exc.name} is missing): "
                           f"pip install lm-eval, or pass --tasks '' to skip them") from None

    if not verbose:
        _quiet_loggers()  # lm_eval configures its logger on import
    if batch_size is None:
        batch_size = 16 if next(model.parameters()).is_cuda else 8
    code_eval = allow_code_eval and any(n in CODE_EVAL_TASKS for n in names)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    sink = io.StringIO()
    with (contextlib.redirect_stderr(sink) if not verbose else contextlib.nullcontext(),
          _code_eval_env(code_eval)):
        task_manager = _task_manager(names)
        _load_checked(task_manager, names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=_max_length(model))
        with _no_git_lookup():
            # log_samples: the per-example scores behind the "correct" series.
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(names), limit=limit, task_manager=task_manager,
                num_fewshot=num_fewshot, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                cache_requests=False, confirm_run_unsafe_code=code_eval,
            )
    model.train(was_training)
    seconds = time.perf_counter() - start
    return _record(results, names, limit, seconds, recorder, num_fewshot=num_fewshot)


@contextlib.contextmanager
def _no_git_lookup():
    """lm-eval runs `git describe` in the working directory to record "its" commit: outside a
    repository git prints "fatal: not a git repository" on the terminal (a child process, past
    any redirect), and inside one it records whichever repository the user stands in. The
    harness records its own versions, so the lookup is skipped."""
    import lm_eval.evaluator as evaluator  # heavy and optional, as above

    if not hasattr(evaluator, "get_git_commit_hash"):  # other lm-eval versions
        yield
        return
    real = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = real


def _max_length(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def _task_metrics(name: str) -> tuple[tuple[str, str, str], ...]:
    return TASK_METRICS.get(name, METRICS)


def _leaves(name: str, group_subtasks: dict) -> list[str]:
    """The tasks that hold ``name``'s samples: itself, or a group's (nested) subtasks."""
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(child, group_subtasks)]


def _per_example(samples: list[dict], metric: str, filter_key: str) -> list[float]:
    """One score per document, in doc_id order. lm-eval logs each document once per filter
    (gsm8k twice), in whatever order its requests came back."""
    rows = sorted((s["doc_id"], float(s[metric])) for s in samples
                  if s.get("filter", "none") == filter_key and metric in s)
    return [value for _, value in rows]


def _record(results: dict, names: tuple[str, ...], limit, seconds: float, recorder,
            num_fewshot: int | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    per_task = results.get("results", {})
    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})
    samples = results.get("samples", {})
    group_subtasks = results.get("group_subtasks", {})
    headline: list[float] = []
    headline_stderr: list[float | None] = []
    for name in names:
        res = per_task.get(name, {})
        # The per-example scores of the task's headline metric, per subtask for a group.
        series: dict[str, list[float]] = {}
        for metric, filter_key, _ in _task_metrics(name):
            if isinstance(res.get(f"{metric},{filter_key}"), (int, float)):
                for leaf in _leaves(name, group_subtasks):
                    values = _per_example(samples.get(leaf) or [], metric, filter_key)
                    if values:
                        series[leaf] = values
                break
        n = (n_samples.get(name) or {}).get("effective")
        if n is None and series:  # a group: lm-eval counts only its subtasks
            n = sum(len(v) for v in series.values())
        first = None
        for metric, filter_key, recorded in _task_metrics(name):
            value = res.get(f"{metric},{filter_key}")
            if not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,{filter_key}")
            # lm-eval's count of shots actually used: a task can pin its own (humaneval 0).
            extra = {"limit": limit, "n": n, "num_fewshot": n_shot.get(name, num_fewshot)}
            if name in OFFLINE_TASKS:
                extra["chance"] = OFFLINE_TASKS[name].chance
            recorder.metric(recorded, float(value), task=name, **extra)
            out[f"{name}/{recorded}"] = float(value)
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            if stderr is not None:  # lm-eval writes "N/A" where it has none (one example)
                recorder.metric(f"{recorded}_stderr", stderr, task=name)
                out[f"{name}/{recorded}_stderr"] = stderr
            if first is None:
                first = float(value)
                headline_stderr.append(stderr)
        if first is not None:
            headline.append(first)
        for leaf, values in series.items():
            recorder.series("correct", values, task=leaf)
        if series:
            count = sum(len(v) for v in series.values())
            recorder.metric("n_examples", count, task=name)
            out[f"{name}/n_examples"] = count
    if headline:
        avg = sum(headline) / len(headline)
        recorder.metric("acc_avg", avg, tasks=",".join(names))
        out["acc_avg"] = avg
        # The tasks score disjoint examples, so their means are independent: the variance of
        # their average is the sum of their variances over k^2.
        if all(s is not None for s in headline_stderr):
            avg_stderr = math.sqrt(sum(s * s for s in headline_stderr)) / len(headline)
            recorder.metric("acc_avg_stderr", avg_stderr, tasks=",".join(names))
            out["acc_avg_stderr"] = avg_stderr
    recorder.metric("tasks_seconds", seconds)
    out["tasks_seconds"] = seconds
    return out
