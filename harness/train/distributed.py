"""One run's training on N workers: Ray Train starts them, FSDP2 shards the model.

The run's own process (the driver of this run) prepares the model as always (calibration,
clipping, GPTQ's Hessians: computed once), builds the training data, writes the prepared
weights to one file and ships the model's skeleton (:mod:`harness.train.model_transfer`), the
objective and the data to ``N`` workers that :class:`ray.train.torch.TorchTrainer` starts (gloo
on CPUs, NCCL on GPUs). Each worker shards every decoder layer and the root with
``torch.distributed.fsdp.fully_shard`` while they are on the meta device (parameters,
gradients and AdamW's moments are split N ways), takes its shards of the weights that rank 0
reads and broadcasts, and trains on its share of each global batch. Rank 0 writes the gathered trained
parameters back to the run folder; the driver loads them, records the training curve, and
finalizes and evaluates the gathered model as a single-process run would.

What does not depend on the worker count: the configured ``batch_size x grad_accum`` is the
global batch; every micro-batch is split over the workers (rows ``rank::N``, shares differing
by one row at most), each worker's loss is weighted by its rows and FSDP averages the
gradients, so the step equals the single-process step up to summation order. A share larger
than ``train.micro_batch`` is taken in pieces with accumulated gradients. The run key does not
contain N (``train_workers`` is a metric).

The teacher (distillation), loaded by rank 0 alone and broadcast, is a whole copy on every
worker, or with ``train.teacher_shard``
(which the memory plan sets when a copy per worker does not fit) sharded like the model: each
layer gathered around its forward, the same outputs. Teacher data missing from the cache is
sampled before training on as many devices (:mod:`harness.train.worker_generation`).

The held-out selection (``train.holdout``, ``train.select_best``) runs on the workers: each
evaluates its rows of every held-out batch, the losses are all-reduced, and the best step's
weights are gathered on rank 0.

Checkpoints are sharded (``torch.distributed.checkpoint``) in ``run_dir/checkpoint-sharded``:
each worker writes its shards; a rerun loads them with any number of workers (DCP reshards).
A worker that dies fails the training with its error; the rerun resumes from the last
checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness.api import Objective, RunContext
from harness.errors import HarnessError, require_module
from harness.ray_cluster import threads_per_worker, worker_failure_line, workers_ready
from harness.train.config import TrainConfig
from harness.train.data import holdout_source
from harness.train.model_transfer import (
    as_skeleton,
    from_rank0,
    materialize,
    read_weights,
    revive,
    write_weights,
)
from harness.train.trainer import (
    CHECKPOINT_DIR,
    SHARDED_CHECKPOINT_DIR,
    Selection,
    batch_at,
    batch_loss,
    check_step_loss,
    copy_trainable,
    enable_grad_checkpointing,
    lr_lambda,
    optimizer_groups,
    optimizer_step,
    trainable_for,
    trainable_parameters,
)

log = logging.getLogger(__name__)

RESULT_DIR = "distributed-result"
INPUT_DIR = "distributed-input"  # the prepared weights the workers load their shards from


def check_distributable(cfg: TrainConfig, workers: int) -> None:
    """Refuses, in one line with the fix, training settings N workers cannot reproduce.

    Raises:
        HarnessError: no worker count, or a micro-batch that leaves a worker without rows.
    """
    if workers < 1:
        raise HarnessError(f"--workers-per-run {workers}: expected 1 or more workers")
    if cfg.batch_size < workers:
        raise HarnessError(
            f"train.batch_size={cfg.batch_size} leaves some of {workers} workers without a "
            f"sequence; set train.batch_size to {workers} or more (lower train.grad_accum to "
            f"keep the global batch) or use fewer workers")


def worker_share(data: torch.Tensor, step: int, micro: int, cfg: TrainConfig, rank: int,
                 workers: int) -> torch.Tensor:
    """The rows of global micro-batch (step, micro) that ``rank`` of ``workers`` trains on."""
    return batch_at(data, step, micro, cfg)[rank::workers]


@torch.no_grad()
def sharded_holdout_loss(model, teacher, objective: Objective, held: torch.Tensor,
                         batch_size: int, rank: int, workers: int, device, amp) -> float:
    """:func:`harness.train.trainer.holdout_loss` with each batch's rows split over the
    workers: the same sequence-weighted mean. Every worker runs one forward per batch (FSDP
    gathers each layer for all of them), one without rows of its own weighted 0."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    try:
        total = torch.zeros(2, device=device)  # sum of loss x rows, rows
        for lo in range(0, held.size(0), batch_size):
            rows = held[lo : lo + batch_size][rank::workers]
            ids = (rows if rows.size(0) else held[lo : lo + 1]).to(device)
            loss = batch_loss(model, teacher, objective, ids, amp).float()
            total += torch.stack([loss * rows.size(0), torch.tensor(float(rows.size(0)),
                                                                    device=device)])
        dist.all_reduce(total)
        return float(total[0] / total[1])
    finally:
        model.train(was_training)


class ShardedSelection(Selection):
    """The held-out selection on sharded workers: the loss over every worker's rows, and the
    best step's weights gathered on rank 0 (every worker takes part in the gather)."""

    def __init__(self, cfg: TrainConfig, held: torch.Tensor, rank: int, workers: int,
                 names: set[str]) -> None:
        super().__init__(cfg, held)
        self.rank, self.workers, self.names = rank, workers, names

    def loss_of(self, model, teacher, objective: Objective, device, amp) -> float:
        return sharded_holdout_loss(model, teacher, objective, self.held, self.cfg.batch_size,
                                    self.rank, self.workers, device, amp)

    def snapshot(self, model) -> dict[str, torch.Tensor]:
        """Called on every worker alike (the loss is all-reduced)."""
        return gathered_trainable(model, self.names, self.rank)


def gathered_trainable(model, names: set[str], rank: int) -> dict[str, torch.Tensor]:
    """The whole trainable weights on rank 0's host (``{}`` elsewhere); every worker must
    call it, each takes part in the gather."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}
    # copies: a worker with nothing to gather (one worker on the CPU) is handed its parameters
    # themselves, which later steps would change under the kept best step. One at a time.
    return {n: full.pop(n).detach().clone(memory_format=torch.contiguous_format)
            for n in list(full) if n in names}


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: every decoder layer is its own unit (gathered only around its forward and
    backward), the rest (embeddings, final norm, lm_head) the root's."""
    from torch.distributed.fsdp import fully_shard

    stack = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(stack, "layers", None) or []
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class ShardedCheckpointer:
    """Trainable parameters and AdamW's state as DCP shards, the step, the scheduler and the
    training curve in ``state.json`` (rank 0). Swapped in whole: a crash mid-save leaves the
    previous checkpoint."""

    def __init__(self, run_dir: Path, spec_hash: str | None, rank: int) -> None:
        self.dir = Path(run_dir) / SHARDED_CHECKPOINT_DIR
        self.tmp = self.dir.with_name(SHARDED_CHECKPOINT_DIR + ".tmp")
        self.spec_hash, self.rank = spec_hash, rank

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    @staticmethod
    def _state(model, opt, names: set[str]) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        params = {n: t for n, t in get_model_state_dict(model).items() if n in names}
        return {"model": params, "optim": get_optimizer_state_dict(model, opt)}

    def save(self, model, opt, sched, names: set[str], meta: dict,
             selection: Selection | None = None) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        dist.barrier()
        dcp.save(self._state(model, opt, names), checkpoint_id=str(self.tmp))
        dist.barrier()
        if self.rank == 0:
            meta = {**meta, "scheduler": sched.state_dict(), "spec_hash": self.spec_hash}
            if selection is not None:
                meta["selection"] = selection.state()
                if selection.best_params:  # rank 0 holds the gathered best weights
                    save_file(selection.best_params, str(self.tmp / "best.safetensors"))
            (self.tmp / "state.json").write_text(json.dumps(meta))
            shutil.rmtree(self.dir, ignore_errors=True)
            self.tmp.rename(self.dir)
        dist.barrier()

    def load(self, model, opt, sched, names: set[str],
             selection: Selection | None = None) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        try:
            meta = json.loads((self.dir / "state.json").read_text())
            if self.spec_hash and meta.get("spec_hash") not in (None, self.spec_hash):
                raise ValueError(f"written by run {meta['spec_hash'][:12]}, not this run")
            state = self._state(model, opt, names)
            dcp.load(state, checkpoint_id=str(self.dir))
            set_model_state_dict(model, state["model"],
                                 options=_options(strict=False))
            set_optimizer_state_dict(model, opt, state["optim"])
            sched.load_state_dict(meta["scheduler"])
            if selection is not None and "selection" in meta:
                best = self.dir / "best.safetensors"
                selection.load(meta["selection"], load_file(str(best))
                               if best.exists() and self.rank == 0 else {})
        except Exception as exc:
            raise HarnessError(f"sharded checkpoint {self.dir} is unreadable "
                               f"({type(exc).__name__}: {str(exc)[:120]}); delete that folder "
                               f"to restart training") from None
        return meta


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _check_run_folder(weights: Path, rank: int) -> None:
    """Every worker writes its checkpoint shards into the run folder and rank 0 reads the
    weights there: a worker that does not see the file the run's process wrote is on a node
    that does not share that folder.

    Raises:
        HarnessError: the weights file is missing here (naming this node).
    """
    if not weights.exists():
        raise HarnessError(
            f"worker {rank} on {socket.gethostname()} does not see the run folder "
            f"{weights.parent.parent} that the run's process wrote; put --output-dir on "
            f"storage every node mounts at the same path")


def _worker_loop(config: dict) -> None:
    """Body of each Ray Train worker (module-level: Ray pickles it by reference): what Ray
    gives it (the payload, its device), then :func:`train_shard`."""
    import ray
    import ray.train

    from harness.eval.memory import reset_peaks

    reset_peaks()
    (model, objective), data, held = ray.get(config["payload"])  # the model: on meta
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    train_shard(model, objective, data, held, config, device)


def train_shard(model: torch.nn.Module, objective: Objective, data: torch.Tensor,
                held: torch.Tensor | None, config: dict, device: torch.device) -> None:
    """One worker's part of a run's training, in the process group its launcher initialized
    (Ray Train's; tests start one without Ray): shards ``model`` (a skeleton on the meta
    device), takes its shards of the weights file, trains its rows of every batch, and rank 0
    writes the trained parameters and the curve to ``run_dir/distributed-result``."""
    import torch.distributed as dist

    from harness.eval.memory import window_peaks
    from harness.models import frozen, load_model
    from harness.train.autocast import autocast_dtype, frozen_linears_in, training_autocast

    rank, workers = dist.get_rank(), dist.get_world_size()
    _check_run_folder(Path(config["weights"]), rank)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    revive(model)
    cfg: TrainConfig = config["cfg"]
    run_dir = Path(config["run_dir"])
    names = {n for n, _ in trainable_parameters(model)}
    enable_grad_checkpointing(model, cfg)
    _shard(model)
    materialize(model, device,  # only this worker's shards
                read_weights(Path(config["weights"])) if rank == 0 else {})
    teacher = None
    if objective.needs_teacher:  # frozen, forward only: a whole copy, or 1/N (teacher_shard)
        teacher = from_rank0(lambda: frozen(load_model(config["model"])[0]), device, rank,
                             _shard if cfg.teacher_shard else None)  # only rank 0 reads it
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = ShardedCheckpointer(run_dir, config["spec_hash"], rank)
    selection = None if held is None else ShardedSelection(cfg, held, rank, workers, names)
    history: list[list[float]] = []
    start, train_s = 0, 0.0
    if ckpt.exists():
        meta = ckpt.load(model, opt, sched, names, selection)
        start, train_s, history = int(meta["step"]), float(meta["train_s"]), meta["history"]
    amp = training_autocast(device)
    model.train()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * (data.size(1) - 1)

    def batch_of(step: int, micro: int) -> torch.Tensor:
        return worker_share(data, step, micro, cfg, rank, workers).to(device)

    # a sharded teacher keeps its fp32 shards (autocast casts each gathered weight): FSDP2
    # holds them, so they cannot be swapped for bf16 copies as a whole teacher's are
    with frozen_linears_in(None if cfg.teacher_shard else teacher, autocast_dtype(device)):
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            if objective.on_step is not None:
                objective.on_step(step)
            total = optimizer_step(model, teacher, objective, opt, params, batch_of, step,
                                   cfg, amp, workers)
            sched.step()
            dist.all_reduce(total)  # gloo has no AVG: each share weighted x N, summed, / N
            value = float(total) / workers
            check_step_loss(value, step + 1, cfg)
            seconds = time.perf_counter() - t0
            train_s += seconds
            history.append([step + 1, value, lr, tokens_per_step / max(seconds, 1e-9)])
            if selection is not None and selection.due(step + 1):
                selection.evaluate(step + 1, model, teacher, objective, device, amp)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                ckpt.save(model, opt, sched, names, {
                    "step": step + 1, "train_s": train_s, "history": history,
                    "workers": workers}, selection)
    if selection is not None and cfg.select_best and selection.best_step is not None:
        chosen = selection.best_params  # the held-out selection's step, not the last
    else:
        chosen = gathered_trainable(model, names, rank)
    peaks = {}
    for kind, value in sorted(window_peaks().items()):  # the largest worker's, per kind
        t = torch.tensor([float(value)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peaks[kind] = float(t)
    if rank == 0:
        out = run_dir / RESULT_DIR
        out.mkdir(parents=True, exist_ok=True)
        save_file(chosen, str(out / "params.safetensors"))
        (out / "result.json").write_text(json.dumps({
            "start": start, "history": history, "train_s": train_s, "workers": workers,
            "peaks": peaks, "selection": None if selection is None else selection.state(),
            "teacher_sharded": None if teacher is None else _is_sharded(teacher)}))
    dist.barrier()


def _trainer_class():
    """Ray Train's TorchTrainer, less its placement-group cleaner on a cluster without a
    dashboard. The cleaner asks Ray's state API (served by the dashboard) whether the
    controller lives; without a dashboard each question hangs for 40 s, so every ``fit()``
    ended by waiting the cleaner's 12 s stop timeout. The placement group needs no cleaner
    there: it belongs to the controller, which belongs to this run's process."""
    import ray
    from ray.train.torch import TorchTrainer

    try:
        from ray._private.worker import get_dashboard_url
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
        has_dashboard = bool(get_dashboard_url())
    except (ImportError, AttributeError, RuntimeError):  # another Ray: keep its defaults
        return TorchTrainer
    if has_dashboard or not ray.is_initialized():
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def worker_inputs(model: torch.nn.Module, objective: Objective, cfg: TrainConfig,
                  ctx: RunContext) -> tuple[Path, torch.Tensor, torch.Tensor | None]:
    """What the workers read, made once in the run's own process: ``(weights file, training
    batches, held-out batches or None)``, the batches on the host. Marks the trainable
    parameters, lets the teacher go (the workers load their own; this one would sit on the
    first GPU while they train) and writes the prepared weights to ``run_dir/distributed-input``
    (:func:`~harness.train.model_transfer.write_weights`), leaving the model on the host."""
    trainable_for(model, cfg)
    data = ctx.train_batches(objective.data).cpu()
    held = ctx.train_batches(holdout_source(objective.data)).cpu() if cfg.holdout else None
    if ctx.release_teacher is not None:
        ctx.release_teacher()
    weights = Path(ctx.run_dir).resolve() / INPUT_DIR / "model.safetensors"
    write_weights(model.to("cpu"), weights)
    return weights, data, held


def worker_config(cfg: TrainConfig, ctx: RunContext, weights: Path, workers: int,
                  use_gpu: bool) -> dict:
    """What :func:`train_shard` reads besides the model, the objective and the batches."""
    return {"cfg": cfg, "run_dir": str(Path(ctx.run_dir).resolve()), "model": ctx.spec.model,
            "seed": ctx.spec.seed, "spec_hash": ctx.spec.spec_hash(), "weights": str(weights),
            "threads": threads_per_worker(workers, use_gpu)}


def train_distributed(model: torch.nn.Module, objective: Objective, cfg: TrainConfig,
                      ctx: RunContext, workers: int, use_gpu: bool = False,
                      ray_address: str | None = None) -> dict:
    """Trains ``model`` in place on ``workers`` Ray Train workers; returns what
    :func:`harness.train.trainer.train` returns.

    Raises:
        HarnessError: settings N workers cannot reproduce, a checkpoint of single-process
            training in the run folder, or a worker that failed or died (rerun to resume).
        TrainingDiverged: the loss became NaN/inf.
    """
    check_distributable(cfg, workers)
    plain = Path(ctx.run_dir) / CHECKPOINT_DIR
    if (plain / "state.json").exists():
        raise HarnessError(f"{plain} was written by single-process training; rerun without "
                           f"--workers-per-run to resume it, or delete that folder")
    require_module("ray.train", "--workers-per-run")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    workers_ready(workers, use_gpu, ray_address)
    import ray

    out = Path(ctx.run_dir) / RESULT_DIR
    shutil.rmtree(out, ignore_errors=True)
    weights, data, held = worker_inputs(model, objective, cfg, ctx)
    with as_skeleton(model):  # the objective in the same pickle: state they share stays shared
        payload = ray.put(((model, objective), data, held))
    if torch.cuda.is_available():  # what this process freed would stay reserved on the GPU
        gc.collect()               # where worker 0 trains
        torch.cuda.empty_cache()
    config = {"payload": payload, "use_gpu": use_gpu,
              **worker_config(cfg, ctx, weights, workers, use_gpu)}
    trainer = _trainer_class()(
        _worker_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU" if use_gpu else "CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str((Path(ctx.run_dir) / "ray-train").resolve()),
                             name="train", failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except Exception as exc:
        raise HarnessError(worker_failure_line(exc, workers, "training", "rerun to resume "
                                               "from the last sharded checkpoint")) from None
    finally:
        del payload
        shutil.rmtree(weights.parent, ignore_errors=True)
    result = json.loads((out / "result.json").read_text())
    trained = load_file(str(out / "params.safetensors"))
    names = {n for n, _ in trainable_parameters(model)}
    if set(trained) != names:
        raise HarnessError(f"the workers returned parameters {sorted(set(trained) ^ names)[:3]} "
                           f"the model does not have; delete {out} and rerun")
    copy_trainable(model, trained)
    model.to(ctx.device)
    _record(ctx.recorder, result, cfg)
    best_step = None
    if result.get("selection") is not None:
        selection = Selection(cfg, held)
        selection.load(result["selection"], {})
        selection.record(ctx.recorder)
        best_step = selection.best_step
    model.eval()
    history = result["history"]
    return {"final_loss": history[-1][1] if history else None, "steps": cfg.steps,
            "resumed_from": result["start"], "best_step": best_step}


def _record(recorder, result: dict, cfg: TrainConfig) -> None:
    """The whole curve, checkpointed steps included: a resumed run's store holds every step
    once, as single-process training's does."""
    if hasattr(recorder, "resume_from"):
        recorder.resume_from(0)
    for step, loss, lr, tps in result["history"]:
        if step % cfg.log_every == 0 or step == cfg.steps:
            recorder.train_step(int(step), float(loss), float(lr), float(tps))
    if result["start"]:
        recorder.metric("resumed_from_step", result["start"])
    if result["history"]:
        recorder.metric("final_train_loss", result["history"][-1][1])
    recorder.metric("train_steps_s_total", result["train_s"])
    recorder.metric("train_workers", result["workers"])
    if result.get("teacher_sharded") is not None:
        recorder.metric("train_teacher_sharded", float(result["teacher_sharded"]))
    for kind, value in result.get("peaks", {}).items():  # the run's own process has its own
        recorder.metric(f"peak_{kind}_mb_train_worker", value)
