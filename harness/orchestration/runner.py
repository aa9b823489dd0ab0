"""Executes one run: load, prepare, train (if the method has an objective), finalize, evaluate.

The same function runs in-process (``--scheduler inline``) and inside a Ray task; results go
to a :class:`~harness.api.Recorder`, never straight to a database from a worker.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from harness import data
from harness.api import Calibration, Method, RunContext
from harness.config import RunSpec
from harness.devices import pick_device
from harness.errors import require_module
from harness.eval import ppl_data
from harness.eval.memory import model_memory, reset_peaks, window_peaks
from harness.eval.ppl import perplexity
from harness.export import save_packed
from harness.models import frozen, load_model
from harness.registry import build_method
from harness.train.config import TrainConfig
from harness.train.data import training_blocks
from harness.train.trainer import train

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_dir_for(output_dir: Path, spec: RunSpec) -> Path:
    return Path(output_dir) / spec.run_key


class _Timer:
    """Times a stage and records its peak host RSS and GPU memory (``peak_*_mb_<stage>``);
    ``peaks`` collects them so the run's overall peaks are the maxima over stages."""

    def __init__(self, recorder, name: str, peaks: dict | None = None) -> None:
        self.recorder, self.name = recorder, name
        self.peaks = peaks if peaks is not None else {}

    def __enter__(self):
        reset_peaks()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        if exc[0] is None:
            self.recorder.metric(f"time_{self.name}_s", self.seconds)
            for kind, value in window_peaks().items():
                self.recorder.metric(f"peak_{kind}_mb_{self.name}", value)
                self.peaks[kind] = max(self.peaks.get(kind, 0.0), value)


def build_context(spec: RunSpec, method: Method, model, tokenizer, recorder, run_dir: Path,
                  device: torch.device, sampler=None) -> RunContext:
    """A RunContext whose expensive members (calibration, teacher, data) load on first use,
    sized by what ``method`` declares (:meth:`~harness.api.Method.needs`, its ``config``);
    missing teacher data sampled by ``sampler`` when given (else by the teacher here)."""
    cache: dict[str, object] = {}
    # a method that declares none still gets calibration blocks and training data if it asks:
    # the default sizes, as before it could declare them
    calib = method.needs().calibration or Calibration()
    train_settings = getattr(method.config, "train", None) or TrainConfig()

    def calibration() -> torch.Tensor:
        if "calib" not in cache:
            cache["calib"] = data.token_blocks(tokenizer, "calibration", calib.seq_len,
                                               calib.samples, seed=spec.seed)
        return cache["calib"]

    def teacher():
        if "teacher" not in cache:
            cache["teacher"] = frozen(load_model(spec.model, device=device)[0])
        return cache["teacher"]

    def train_batches(source: str) -> torch.Tensor:
        key = f"train:{source}"
        if key not in cache:
            cache[key] = training_blocks(spec, train_settings, tokenizer, source, teacher,
                                         device, sampler)
        return cache[key]

    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(spec=spec, device=device, tokenizer=tokenizer, recorder=recorder,
                      run_dir=run_dir, calibration=calibration, teacher=teacher,
                      train_batches=train_batches,
                      release_teacher=lambda: cache.pop("teacher", None))


def evaluate(model, tokenizer, spec: RunSpec, recorder, progress: bool = True) -> dict:
    """Paper-style perplexity on each of the spec's data sets (each with its 95% interval and
    its per-window NLL for paired comparisons), memory, then the accuracy tasks; returns the
    metrics."""
    out: dict[str, float] = {}
    mem = model_memory(model)
    for name, value in mem.items():
        recorder.metric(name, value)
        out[name] = value
    for entry in spec.eval.ppl_data:
        name = ppl_data.metric_name(entry)
        ids = ppl_data.load_ids(entry, tokenizer, spec.eval.seq_len)
        res = perplexity(model, ids, seq_len=spec.eval.seq_len, max_tokens=spec.eval.max_tokens,
                         progress=progress, desc=f"{spec.method} {name}")
        capped = spec.eval.max_tokens is not None and spec.eval.max_tokens < ids.numel()
        extra = dict(dataset=ppl_data.label(entry), seq_len=spec.eval.seq_len,
                     tokens=res.tokens, predicted=res.predicted, windows=res.windows,
                     total_available=int(ids.numel()), capped=capped)
        recorder.metric(name, res.ppl, **extra)
        recorder.series("nll", res.window_nll, task=name)
        interval = res.interval()
        if interval is not None:
            recorder.metric(f"{name}_ci95_low", interval[0])
            recorder.metric(f"{name}_ci95_high", interval[1])
            out.update({f"{name}_ci95_low": interval[0], f"{name}_ci95_high": interval[1]})
        recorder.metric(f"{name}_tokens", res.tokens)
        if name == "ppl":
            recorder.metric("eval_tokens_per_s", res.tokens / max(res.seconds, 1e-9))
        out.update({name: res.ppl, f"{name}_tokens": res.tokens})
    if spec.eval.tasks:
        evaluate_tasks = require_module("harness.eval.accuracy", "--tasks").evaluate_tasks
        out.update(evaluate_tasks(model, tokenizer, spec.eval.tasks, spec.eval.limit, recorder,
                                  num_fewshot=spec.eval.num_fewshot,
                                  allow_code_eval=spec.eval.allow_code_eval))
    return out


def _park_on_host(model: torch.nn.Module) -> None:
    """A run trained by GPU workers keeps its prepared student in host memory from here on: the
    workers read it from a file this process writes from the host, and the GPU it would sit on
    is where this process loads the teacher (teacher data, CAKLD's gamma) and where worker 0
    trains (the memory plan counts no student in the objective phase of such a run)."""
    model.to("cpu")
    torch.cuda.empty_cache()


def execute_run(spec: RunSpec, recorder, output_dir: str | Path = "runs",
                device: str | None = None, progress: bool = True, workers: int | None = None,
                ray_address: str | None = None) -> dict:
    """Runs ``spec`` end to end and returns its metrics. With ``workers`` its training runs on
    that many Ray Train workers with FSDP2 (:mod:`harness.train.distributed`; GPUs where the
    run's device is one), and missing teacher data is sampled on as many devices; everything
    else runs in this process.

    Raises:
        HarnessError: bad input discovered while running (the caller marks the run failed).
    """
    dev = pick_device(device)
    seed_everything(spec.seed)
    method = build_method(spec)
    run_dir = run_dir_for(Path(output_dir), spec)
    peaks: dict[str, float] = {}
    with _Timer(recorder, "load", peaks):
        model, tokenizer = load_model(spec.model, device=dev)
    sampler = None
    if workers and workers > 1:  # the teacher data, if missing, sampled on as many devices
        from harness.train.worker_generation import WorkerSampler  # imports Ray on use

        sampler = WorkerSampler(spec.model, workers, dev.type == "cuda", ray_address,
                                on_sampled=lambda n: recorder.metric("teacher_data_workers", n))
    ctx = build_context(spec, method, model, tokenizer, recorder, run_dir, dev, sampler)
    with _Timer(recorder, "prepare", peaks):
        model = method.prepare(model, ctx)
    parked = bool(workers) and dev.type == "cuda"
    if parked:  # see _park_on_host
        _park_on_host(model)
    with _Timer(recorder, "objective", peaks):  # teacher data and CAKLD's gamma come here
        objective = method.objective(ctx)
    if parked and objective is None:
        model.to(dev)
    if objective is not None:
        for name, value in objective.metrics.items():
            recorder.metric(name, value)
        with _Timer(recorder, "train", peaks):
            if workers:
                from harness.train.distributed import train_distributed  # imports Ray

                train_distributed(model, objective, method.config.train, ctx, workers,
                                  use_gpu=dev.type == "cuda", ray_address=ray_address)
            else:
                train(model, objective, method.config.train, ctx, progress=progress)
    with _Timer(recorder, "finalize", peaks):
        model = method.finalize(model, ctx)
    if method.quantizes:
        path = save_packed(model, spec, run_dir)
        recorder.artifact("packed", str(path))
    with _Timer(recorder, "eval", peaks):
        metrics = evaluate(model, tokenizer, spec, recorder, progress=progress)
    for kind, value in peaks.items():
        recorder.metric(f"peak_{kind}_mb", value)
        metrics[f"peak_{kind}_mb"] = value
    if not all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items()
               if k.startswith("ppl") and not k.endswith("_tokens")):
        log.warning("%s: perplexity is not finite", spec.run_key)
    return metrics

