"""Ray scheduler: one Ray task per run; results flow back to the driver, which alone writes.

The driver (``harness run``) creates each run row (``store.begin_run``) before dispatch, sends
one task per run, and as each task returns it replays the task's buffered records (metrics,
train steps, layer stats, artifacts) into the store and closes the run. Workers never open the
database, so SQLite sees a single writer however many runs execute at once.

Teacher data (BitDistiller, OneBit) is generated once per (model, sampling settings) by its own
Ray task; the runs that need it take that task's result as an argument, so Ray starts them only
after the cache file exists and no two workers generate the same data.

A worker that dies (killed, out of memory, node lost) marks its run failed with
"worker died; rerun to resume"; the records it had already produced are recovered from a spool
file in the run folder, and a rerun resumes training from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

from harness.config import RunSpec
from harness.devices import pick_device
from harness.errors import HarnessError
from harness.host_memory import keep_freed_memory
from harness.interrupts import explain
from harness.models import load_model
from harness.orchestration.recorders import BufferRecorder, replay
from harness.orchestration.runner import execute_run, run_dir_for
from harness.orchestration.scheduler import Outcome, busy, describe_error
from harness.ray_cluster import init_ray
from harness.registry import build_method
from harness.store import Run, RunBusy
from harness.train.teacher_data import teacher_sequences

log = logging.getLogger(__name__)

WORKER_DIED = "worker died; rerun to resume"
SPOOL_NAME = ".ray-records.jsonl"


# --- worker side -----------------------------------------------------------------------------
class _SpoolList(list):
    """A record list that also appends each record to a file, line-buffered, so the records of a
    worker that is killed can be recovered by the driver."""

    def __init__(self, file) -> None:
        super().__init__()
        self.file = file

    def append(self, item) -> None:
        super().append(item)
        kind, kw = item
        self.file.write(json.dumps([kind, kw], default=str) + "\n")


def _spool_recorder(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = BufferRecorder()
    rec.records = _SpoolList(open(path, "w", buffering=1))
    return rec


def run_task(spec: RunSpec, output_dir: str, device: str | None, *deps) -> dict:
    """Body of the Ray task for one run (also callable in-process, which tests use).

    ``deps`` are the results of teacher-data tasks this run waits for (unused here: the cache
    they filled is read by the runner).

    Returns:
        ``status``, ``error``, ``metrics``, ``records`` (for :func:`harness.orchestration.recorders.replay`),
        ``wall_s``, ``device``, ``host``, ``pid``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()  # a Ray worker is a long-lived process of its own
    start = time.perf_counter()
    spool = run_dir_for(Path(output_dir), spec) / SPOOL_NAME
    rec = _spool_recorder(spool)
    try:
        metrics = execute_run(spec, rec, output_dir, device, progress=False)
        status, error = "finished", None
    except Exception as exc:  # the run fails, the worker and the other runs carry on
        status, error, metrics = "failed", describe_error(exc), {}
        if not isinstance(exc, HarnessError):
            error += "\n" + traceback.format_exc(limit=8)
    finally:
        rec.records.file.close()
    dev = pick_device(device)
    dev_name = "cpu"
    if dev.type == "cuda":
        dev_name = f"cuda:{torch.cuda.get_device_name(dev)}"
    return dict(status=status, error=error, metrics=metrics, records=list(rec.records),
                wall_s=time.perf_counter() - start, device=dev_name,
                host=socket.gethostname(), pid=os.getpid())


def teacher_task(model: str, model_key: str, samples: int, new_tokens: int, temperature: float,
                 top_k: int, top_p: float, device: str | None) -> str | None:
    """Generates (or finds cached) teacher continuations; returns an error line or ``None``.

    Never raises: a failure here is reported by the dependent runs, which retry generation and
    fail with the real message.
    """
    try:
        keep_freed_memory()
        # One load gives the tokenizer and the teacher (cheap next to generation; on a cache hit
        # the model is simply dropped).
        teacher, tokenizer = load_model(model, device=pick_device(device))
        teacher_sequences(model_key, lambda: teacher.eval(), tokenizer, samples, new_tokens,
                          temperature, seed=0, progress=False, top_k=top_k, top_p=top_p)
        return None
    except Exception as exc:
        return describe_error(exc)


def teacher_key(spec: RunSpec) -> tuple | None:
    """``(model, model_key, samples, new_tokens, temperature, top_k, top_p)`` of the teacher
    data ``spec`` reads (the arguments of :func:`teacher_task` before the device), or None.

    The method says (``needs().teacher_data``, sampled as its training settings ask, which is
    what :func:`harness.train.data.training_blocks` reads); the scheduler knows no method.
    """
    sampling = build_method(spec).needs().teacher_data
    if sampling is None:
        return None
    return (spec.model, spec.model_key, sampling.samples, sampling.new_tokens,
            sampling.temperature, sampling.top_k, sampling.top_p)


# --- driver side -----------------------------------------------------------------------------
def _gpus_per_task(requested: float) -> float:
    """``requested`` GPUs per run; 0 means one whole GPU where the cluster has GPUs, else CPU."""
    import ray  # heavy and optional: this module imports without it

    available = ray.cluster_resources().get("GPU", 0)
    if available <= 0:
        if requested > 0:
            log.warning("--gpus-per-run %s: the Ray cluster has no GPU; running on CPU", requested)
        return 0.0
    if requested <= 0:
        return 1.0
    if requested > available:
        raise HarnessError(f"--gpus-per-run {requested} exceeds the cluster's {available:g} GPUs; "
                           f"use at most {available:g}")
    return requested


def _crash_message(exc: BaseException) -> str:
    import ray.exceptions as rex  # heavy and optional: this module imports without it

    died = tuple(getattr(rex, n) for n in ("WorkerCrashedError", "NodeDiedError",
                                           "ActorDiedError", "LocalRayletDiedError",
                                           "ObjectLostError", "OwnerDiedError")
                 if hasattr(rex, n))
    if hasattr(rex, "OutOfMemoryError") and isinstance(exc, rex.OutOfMemoryError):
        return "worker died (out of memory); rerun to resume"
    if isinstance(exc, died):
        return WORKER_DIED
    if hasattr(rex, "TaskCancelledError") and isinstance(exc, rex.TaskCancelledError):
        return "cancelled; rerun to resume"
    if isinstance(exc, rex.RayTaskError):
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        return describe_error(getattr(cause, "cause", None) or cause)
    return describe_error(exc)


def read_spool(path: Path) -> list:
    """Records a dead worker had written.

    Only a torn last line is dropped: the worker died in the middle of writing it, so no
    newline follows it. Any complete line that is not a record means the file was damaged, and
    replaying around it would store a run with a hole in it.

    Raises:
        HarnessError: a complete line that is not a record, naming the file and the line.
    """
    out: list = []
    if not path.exists():
        return out
    lines = path.read_text(errors="replace").split("\n")
    lines.pop()  # "" after the final newline, or the torn line a SIGKILL cut short
    for number, line in enumerate(lines, 1):
        try:
            kind, kw = json.loads(line)
            if not isinstance(kind, str) or not isinstance(kw, dict):
                raise TypeError(f"expected [kind, {{...}}], got {line[:60]!r}")
        except (ValueError, TypeError) as exc:
            raise HarnessError(
                f"the worker's record spool {path} is damaged at line {number} ({exc}); its "
                f"records cannot be recovered: delete that file and rerun to resume from the "
                f"last checkpoint") from None
        out.append((kind, kw))
    return out


def _recover(path: Path, error: str) -> tuple[list, str]:
    """(records, error) of a run whose worker is gone; a damaged spool joins the run's error
    instead of stopping the driver, which still has other runs to close."""
    try:
        return read_spool(path), error
    except HarnessError as exc:
        return [], f"{error}; {exc}"


def _set_device(store, run_id: int, device: str) -> None:
    with store.session() as s, s.begin():
        s.get(Run, run_id).device = device


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_with_ray(pending: list[RunSpec], store, output_dir, device: str | None,
                 experiment_id: int | None, ray_address: str | None = None,
                 gpus_per_run: float = 0.0, cpus_per_run: float = 1.0) -> dict[str, Outcome]:
    """Runs ``pending`` as Ray tasks; the calling process writes every result.

    Args:
        pending: specs to run (already filtered: no finished ones unless forced).
        store: the results database (written only here).
        output_dir: run folders; must be shared with the workers (same machine or shared FS).
        device: passed to each run (``None``: the GPU Ray assigns, else CPU).
        experiment_id: experiments-table row the runs belong to.
        ray_address: join this cluster instead of starting a local one.
        gpus_per_run: GPUs per task (fractions share a GPU); 0 = 1 with GPUs, else CPU.
        cpus_per_run: CPUs Ray reserves per task (fractions run more tasks than cores).

    Returns:
        ``{spec_hash: Outcome}`` for every pending spec.

    Raises:
        HarnessError: Ray is not installed, or the cluster at ``ray_address`` cannot be joined
            (before any run row is written).
    """
    try:
        import ray
    except ImportError:  # the module imports without Ray so that this can say it in a line
        raise HarnessError("the Ray scheduler needs the package 'ray': install it (pip install "
                           "'ray>=2.30'), or pass --scheduler inline") from None

    output_dir = Path(output_dir).resolve()
    started = init_ray(ray_address)
    outcomes: dict[str, Outcome] = {}
    refs: dict = {}
    t0 = time.perf_counter()
    try:
        gpus = _gpus_per_task(gpus_per_run)
        res = ray.cluster_resources()
        _say(f"ray: {len(pending)} run(s) on {res.get('CPU', 0):g} CPU / {res.get('GPU', 0):g} "
             f"GPU; {gpus:g} GPU and {cpus_per_run:g} CPU per run")
        # max_retries=0: a dead worker is reported (and resumed by a rerun), not silently retried
        remote_run = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus, max_retries=0)(run_task)
        remote_teacher = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(teacher_task)
        teachers: dict[tuple, object] = {}
        for spec in pending:
            key = teacher_key(spec)
            if key is not None and key not in teachers:
                _say(f"ray: teacher data for {key[0]} ({key[2]} x {key[3]} tokens), once, "
                     f"before the runs that need it")
                teachers[key] = remote_teacher.remote(*key, device)
        for spec in pending:
            try:
                run = store.begin_run(spec, experiment_id, device="ray")
            except RunBusy as exc:  # another live process runs it (Store.begin_run)
                outcomes[spec.spec_hash()] = busy(spec, store.find_run(spec.spec_hash()).id,
                                                  exc.owner)
                continue
            key = teacher_key(spec)
            deps = [teachers[key]] if key is not None else []
            ref = remote_run.options(name=f"{spec.method}-{spec.run_key}").remote(
                spec, str(output_dir), device, *deps)
            refs[ref] = (spec, run.id)
        total, done_n = len(refs), 0
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            ref = ready[0]
            spec, run_id = refs.pop(ref)
            done_n += 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                records, error = _recover(run_dir_for(output_dir, spec) / SPOOL_NAME,
                                          _crash_message(exc))
                result = dict(status="failed", error=error, metrics={}, records=records,
                              wall_s=None, device=None)
            replay(result["records"], store, run_id)
            if result.get("device"):
                _set_device(store, run_id, result["device"])
            store.end_run(run_id, result["status"], result["error"], result.get("wall_s"))
            outcomes[spec.spec_hash()] = Outcome(spec, run_id, result["status"],
                                                 result["error"], result["metrics"])
            took = f"{result['wall_s']:.1f} s" if result.get("wall_s") is not None else "-"
            first = (result["error"] or "").splitlines()[0] if result["error"] else ""
            _say(f"[{done_n}/{total}] {spec.run_key} {spec.method:12s} {result['status']} "
                 f"in {took} (elapsed {time.perf_counter() - t0:.0f} s){': ' + first if first else ''}")
    except KeyboardInterrupt as exc:
        for ref, (spec, run_id) in refs.items():
            ray.cancel(ref, force=True)
            # what the worker logged before it was stopped (its steps up to the checkpoint the
            # rerun resumes from); a rerun's worker starts a new spool
            records, error = _recover(run_dir_for(output_dir, spec) / SPOOL_NAME,
                                      str(explain(exc)))
            replay(records, store, run_id)
            store.end_run(run_id, "failed", error)
        raise
    finally:
        if started:
            ray.shutdown()
    return outcomes
