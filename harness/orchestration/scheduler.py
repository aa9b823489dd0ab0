"""Runs a list of specs: skip finished ones, run the rest, store every outcome.

``inline`` executes in this process (no Ray import). ``ray`` (default where Ray is installed and
more than one run is pending) sends one task per run; results come back to this driver, which
alone writes the database.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config import RunSpec
from harness.devices import pick_device
from harness.errors import HarnessError, describe_error, require_module
from harness.interrupts import explain
from harness.orchestration.recorders import StoreRecorder
from harness.orchestration.runner import execute_run, run_dir_for
from harness.store import RunBusy, Store
from harness.train.trainer import CHECKPOINT_DIR, SHARDED_CHECKPOINT_DIR

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    spec: RunSpec
    run_id: int
    status: str  # finished | failed | skipped | busy (running in another live process)
    error: str | None = None
    metrics: dict = field(default_factory=dict)


def busy(spec: RunSpec, run_id: int, owner: str | None) -> Outcome:
    """The outcome of a run left to the live process that runs it (``harness run`` says so)."""
    return Outcome(spec, run_id, "busy", f"running in another process ({owner})")


def check_output_dir(output_dir: Path) -> None:
    """Fails before any run row is written when run folders cannot be created there.

    Raises:
        HarnessError: the folder cannot be created or written (read-only, a file, no permission).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise HarnessError(f"output folder {str(output_dir)!r} is a file; pass --output-dir with "
                           f"a writable folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise HarnessError(f"output folder {str(output_dir)!r} is not writable "
                           f"({exc.strerror or type(exc).__name__}); pass --output-dir with a "
                           f"writable folder") from None


def run_inline(spec: RunSpec, store: Store, run_id: int, output_dir: Path,
               device: str | None, progress: bool, workers: int | None = None,
               ray_address: str | None = None) -> tuple[str, str | None, dict]:
    try:
        metrics = execute_run(spec, StoreRecorder(store, run_id), output_dir, device, progress,
                              workers=workers, ray_address=ray_address)
        return "finished", None, metrics
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under harness.interrupts
        store.end_run(run_id, "failed", str(explain(exc)))
        raise
    except Exception as exc:  # one failed run never stops the others
        log.debug("run %s failed", spec.run_key, exc_info=True)
        detail = describe_error(exc)
        if not isinstance(exc, HarnessError):
            detail += "\n" + traceback.format_exc(limit=8)
        return "failed", detail, {}


def execute(specs: list[RunSpec], store: Store, output_dir: str | Path = "runs",
            scheduler: str = "inline", force: bool = False, device: str | None = None,
            progress: bool = True, experiment_id: int | None = None,
            ray_address: str | None = None, gpus_per_run: float = 0.0,
            cpus_per_run: float = 1.0, workers_per_run: int | None = None) -> list[Outcome]:
    """Runs every spec not already finished; returns one outcome per spec, in order.

    Args:
        specs: the runs (duplicates by hash are run once).
        store: results database (only this process writes to it).
        output_dir: run folders (checkpoints, packed models).
        scheduler: ``inline`` or ``ray``.
        force: rerun finished runs too.
        workers_per_run: train each run on that many Ray Train workers (FSDP2); the runs
            then go one after another, each spanning its workers (``scheduler`` is not used).
    """
    # absolute: the packed file's path is stored, and `harness export/eval` may run elsewhere
    output_dir = Path(output_dir).expanduser().resolve()
    unique: dict[str, RunSpec] = {}
    if specs:
        check_output_dir(output_dir)
    for spec in specs:
        unique.setdefault(spec.spec_hash(), spec)
    outcomes: dict[str, Outcome] = {}
    pending: list[RunSpec] = []
    for h, spec in unique.items():
        existing = store.find_run(h)
        if existing is not None and existing.status == "finished" and not force:
            outcomes[h] = Outcome(spec, existing.id, "skipped",
                                  metrics=store.metric_dict(existing.id))
        else:
            if force and existing is not None and existing.status == "finished":
                # --force recomputes: a final-step checkpoint would only be reloaded
                for name in (CHECKPOINT_DIR, SHARDED_CHECKPOINT_DIR):
                    shutil.rmtree(run_dir_for(output_dir, spec) / name, ignore_errors=True)
            pending.append(spec)
    if scheduler == "ray" and pending and not workers_per_run:
        # imported by name: harness.orchestration.ray_scheduler imports this module (Outcome, busy)
        run_with_ray = require_module("harness.orchestration.ray_scheduler", "the Ray scheduler").run_with_ray
        for h, outcome in run_with_ray(pending, store, output_dir, device, experiment_id,
                                       ray_address, gpus_per_run, cpus_per_run).items():
            outcomes[h] = outcome
    else:
        if scheduler not in ("inline", "ray"):
            raise HarnessError(f"unknown scheduler {scheduler!r}; use inline or ray")
        for spec in pending:
            try:
                run = store.begin_run(spec, experiment_id, device=str(_device_name(device)))
            except RunBusy as exc:  # another live process runs it (Store.begin_run)
                outcomes[spec.spec_hash()] = busy(spec, store.find_run(spec.spec_hash()).id,
                                                  exc.owner)
                continue
            start = time.perf_counter()
            status, error, metrics = run_inline(spec, store, run.id, output_dir, device, progress,
                                                workers_per_run, ray_address)
            store.end_run(run.id, status, error, time.perf_counter() - start)
            outcomes[spec.spec_hash()] = Outcome(spec, run.id, status, error, metrics)
    return [outcomes[s.spec_hash()] for s in specs]


def _device_name(device: str | None) -> str:
    dev = pick_device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return "cpu"
