"""Accuracy through lm-eval on the in-memory (possibly quantized) model.

``evaluate_tasks`` wraps the model in lm-eval's ``HFLM`` (which only calls the model's
``forward``, so ``QuantLinear`` / ``OneBitLinear`` layers need nothing special) and runs
``lm_eval.simple_evaluate`` with a ``TaskManager`` that also sees the harness's offline tasks
(built from the held-out plays, see :mod:`harness.eval.task_data`). Everything runs offline:
a standard suite whose data is not in the local Hugging Face cache is a one-line error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time

from harness.errors import HarnessError
from harness.eval.task_data import OFFLINE_TASKS, tasks_dir

# Accepted by name; they need their Hugging Face dataset in the local cache (no network here).
STANDARD_TASKS = ("arc_challenge", "arc_easy", "piqa", "hellaswag", "winogrande", "boolq",
                  "mmlu", "lambada_openai")
# Metrics lm-eval reports that we record (per task); the stderr of each where computed.
METRICS = ("acc", "acc_norm")
# Bootstrap is only used for non-mean aggregations; acc/acc_norm stderr is analytic (cheap).
BOOTSTRAP_ITERS = 100
# What `datasets` (5.x) and `huggingface_hub` raise for a dataset that is neither cached nor
# reachable: ConnectionError when offline or without network (datasets wraps the hub's
# OfflineModeIsEnabled, itself one, and its network errors in it: measured with arc_easy and
# piqa), FileNotFoundError for "not found" (DatasetNotFoundError, DataFilesNotFoundError,
# EmptyDatasetError and the hub's LocalEntryNotFoundError subclass it). Anything else loading a
# suite is a bug and surfaces as itself.
MISSING_DATA_ERRORS = (ConnectionError, FileNotFoundError)


def _offline_env() -> None:
    # Must be set before ``datasets`` / ``huggingface_hub`` are imported to take effect.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def available_tasks() -> list[str]:
    return [*OFFLINE_TASKS, *STANDARD_TASKS]


def check_task_names(tasks) -> tuple[str, ...]:
    """Validates names before any model work.

    Raises:
        HarnessError: a name that is neither an offline task nor a supported standard suite.
    """
    names = tuple(t.strip() for t in tasks if t and t.strip())
    if not names:
        raise HarnessError(f"no tasks given; use some of: {', '.join(available_tasks())}")
    for name in names:
        if name not in OFFLINE_TASKS and name not in STANDARD_TASKS:
            import difflib

            close = difflib.get_close_matches(name, available_tasks(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HarnessError(
                f"unknown task {name!r}{hint}; offline tasks: {', '.join(OFFLINE_TASKS)}; "
                f"standard suites (need their data cached): {', '.join(STANDARD_TASKS)}"
            )
    return names


def _quiet_loggers():
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _task_manager(names: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

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
    tasks always are); without standard suites it costs nothing.

    Raises:
        HarnessError: as :func:`check_task_names`, or a suite whose data is missing.
    """
    names = check_task_names(tasks)
    if all(n in OFFLINE_TASKS for n in names):
        return
    _offline_env()
    _quiet_loggers()
    with contextlib.redirect_stderr(io.StringIO()):
        task_manager = _task_manager(names)
    _load_checked(task_manager, names)


def evaluate_tasks(model, tokenizer, tasks, limit: int | None, recorder,
                   batch_size: int | None = None, verbose: bool = False) -> dict[str, float]:
    """Runs lm-eval ``tasks`` on ``model`` and records per-task metrics.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``; quantized layers are fine).
        tokenizer: its tokenizer.
        tasks: task names (offline ``shakespeare_*`` tasks or standard suites).
        limit: first ``limit`` examples of each task (None = all).
        recorder: gets ``metric(name, value, task=...)`` per task and ``acc_avg`` overall.
        batch_size: lm-eval batch size (default 16 on CUDA, 8 on CPU).
        verbose: keep lm-eval's logging and stderr output.

    Returns:
        ``{"<task>/acc": x, "<task>/acc_stderr": s, "<task>/acc_norm": y, ..., "acc_avg": a}``.

    Raises:
        HarnessError: unknown task name, or a standard suite whose data is not cached.
    """
    names = check_task_names(tasks)
    _offline_env()
    if not verbose:
        _quiet_loggers()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ModuleNotFoundError as exc:
        raise HarnessError(f"accuracy tasks need lm-eval ({exc.name} is missing): "
                           f"pip install lm-eval, or pass --tasks '' to skip them") from None

    if not verbose:
        _quiet_loggers()  # lm_eval configures its logger on import
    if batch_size is None:
        batch_size = 16 if next(model.parameters()).is_cuda else 8
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink) if not verbose else contextlib.nullcontext():
        task_manager = _task_manager(names)
        _load_checked(task_manager, names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=_max_length(model))
        with _no_git_lookup():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(names), limit=limit, task_manager=task_manager,
                bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, cache_requests=False,
            )
    model.train(was_training)
    seconds = time.perf_counter() - start
    return _record(results, names, limit, seconds, recorder)


@contextlib.contextmanager
def _no_git_lookup():
    """lm-eval runs `git describe` in the working directory to record "its" commit: outside a
    repository git prints "fatal: not a git repository" on the terminal (a child process, past
    any redirect), and inside one it records whichever repository the user stands in. The
    harness records its own versions, so the lookup is skipped."""
    import lm_eval.evaluator as evaluator

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


def _record(results: dict, names: tuple[str, ...], limit, seconds: float,
            recorder) -> dict[str, float]:
    out: dict[str, float] = {}
    per_task = results.get("results", {})
    n_samples = results.get("n-samples", {})
    headline: list[float] = []
    for name in names:
        res = per_task.get(name, {})
        n = (n_samples.get(name) or {}).get("effective")
        first = None
        for metric in METRICS:
            value = res.get(f"{metric},none")
            if not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,none")
            extra = {"limit": limit, "n": n}
            if name in OFFLINE_TASKS:
                extra["chance"] = OFFLINE_TASKS[name].chance
            recorder.metric(metric, float(value), task=name, **extra)
            out[f"{name}/{metric}"] = float(value)
            if isinstance(stderr, (int, float)):
                recorder.metric(f"{metric}_stderr", float(stderr), task=name)
                out[f"{name}/{metric}_stderr"] = float(stderr)
            if first is None:
                first = float(value)
        if first is not None:
            headline.append(first)
    if headline:
        avg = sum(headline) / len(headline)
        recorder.metric("acc_avg", avg, tasks=",".join(names))
        out["acc_avg"] = avg
    recorder.metric("tasks_seconds", seconds)
    out["tasks_seconds"] = seconds
    return out
