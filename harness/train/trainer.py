"""The shared training loop: AdamW, schedules, accumulation, clipping, checkpoints, resume,
held-out evaluation and best-step selection.

Methods only supply an :class:`~harness.api.Objective`; the loop is the same for QAT,
BitDistiller and OneBit. Checkpoints are safetensors (trainable parameters, and the best step's
when selecting) plus the optimizer state loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from harness import interrupts
from harness.api import Objective, ObjectiveInputs, RunContext
from harness.errors import HarnessError, TrainingDiverged
from harness.models import no_cache
from harness.quant.batched import BatchedFakeQuant, BatchedOneBit
from harness.train.autocast import autocast_dtype, frozen_linears_in, training_autocast
from harness.train.config import TrainConfig, share_pieces
from harness.train.data import holdout_source

log = logging.getLogger(__name__)

#: run-folder subfolders of a run's training checkpoint: this trainer's, and the sharded one of
#: training on several workers (harness.train.distributed); a run resumes only from its own kind
CHECKPOINT_DIR = "checkpoint"
SHARDED_CHECKPOINT_DIR = "checkpoint-sharded"


def set_embeddings_trainable(model: nn.Module, trainable: str) -> None:
    """``train.trainable``: the input embeddings and lm_head train with ``"all"`` only (one
    tensor when tied, as in SmolLM2); every other parameter keeps what ``prepare`` gave it."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(trainable == "all")


def enable_grad_checkpointing(model: nn.Module, cfg: TrainConfig) -> None:
    """``train.grad_checkpointing``: Hugging Face's per-layer recomputation, non-reentrant (the
    form that works with frozen inputs and with FSDP2)."""
    if cfg.grad_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise HarnessError(f"train.grad_checkpointing: {type(model).__name__} has no "
                               f"gradient_checkpointing_enable; set it false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def copy_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Writes ``tensors`` (host copies by name) into the model's trainable parameters."""
    named = dict(trainable_parameters(model))
    with torch.no_grad():
        for n, t in tensors.items():
            named[n].copy_(t.to(named[n].device))


def trainable_for(model: nn.Module, cfg: TrainConfig) -> list[nn.Parameter]:
    """The parameters ``cfg`` trains (``train.trainable`` applied).

    Raises:
        HarnessError: every parameter is frozen.
    """
    set_embeddings_trainable(model, cfg.trainable)
    if cfg.trainable == "all":
        # harness/export.py leaves embeddings and lm_head out of the packed file and checks
        # the base model by its embedding: the run's own metrics are of the trained model,
        # a later `harness eval`/`export` of it refuses the file
        log.warning("train.trainable=all: the packed file does not store the trained "
                    "embeddings/lm_head; this run's metrics are right, but `harness eval` and "
                    "`harness export` of it will refuse its packed file")
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise HarnessError("nothing to train: every parameter is frozen")
    return params


# Hugging Face Trainer's rule (get_decay_parameter_names), which the papers' code trains with:
# biases and normalization weights are not decayed, everything else (linears, OneBit's value
# vectors) is. Decaying a norm's gain pulls the layer's output scale towards zero.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that weight decay leaves alone: biases, and the parameters of any
    normalization module (by type, e.g. LlamaRMSNorm, or by name)."""
    names = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or _NO_DECAY.search(full.lower()):
                names.add(full)
    return names


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: one group without decay; with decay, the decayed parameters and
    then the exempt ones (weight_decay 0), each in the model's parameter order."""
    named = trainable_parameters(model)
    if not weight_decay:
        return [{"params": [p for _, p in named]}]
    exempt = no_decay_names(model)
    groups = [{"params": [p for n, p in named if n not in exempt], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the peak lr at a step: linear warm-up, then constant or cosine to 0."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class Checkpointer:
    """Saves/loads trainable parameters + optimizer + scheduler + step in ``run_dir/checkpoint``,
    the seconds spent in training steps so far (``train_s``, summed over resumes) and the
    held-out selection's state (its curve, and the best step's weights when selecting)."""

    def __init__(self, run_dir: Path, spec_hash: str | None = None) -> None:
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.spec_hash = spec_hash  # written into state.json; a load for another spec fails
        self.train_s = 0.0
        self.loss: float | None = None  # the last saved step's loss (a finished run's final)

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def save(self, step: int, model, opt, sched, train_s: float = 0.0,
             loss: float | None = None, selection: Selection | None = None) -> None:
        tmp = self.dir.with_name("checkpoint.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model)}
        save_file(params, str(tmp / "params.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                   tmp / "optim.pt")
        state = {"step": step, "train_s": train_s, "loss": loss}
        if selection is not None:
            state["selection"] = selection.state()
            if selection.best_params:
                save_file(selection.best_params, str(tmp / "best.safetensors"))
        if self.spec_hash:
            state["spec_hash"] = self.spec_hash
        (tmp / "state.json").write_text(json.dumps(state))
        if self.dir.exists():
            shutil.rmtree(self.dir)
        tmp.rename(self.dir)  # atomic swap: a crash mid-save leaves the previous checkpoint

    def load(self, model, opt, sched, selection: Selection | None = None) -> int:
        try:
            meta = json.loads((self.dir / "state.json").read_text())
            step = int(meta["step"])
            train_s = float(meta.get("train_s", 0.0))  # absent before 2026-11-26
            written_for = meta.get("spec_hash")  # absent in checkpoints of older versions
            if self.spec_hash and written_for and written_for != self.spec_hash:
                raise ValueError(f"written by run {written_for[:12]}, not this run "
                                 f"{self.spec_hash[:12]}")
            params = load_file(str(self.dir / "params.safetensors"))
            if set(params) != {n for n, _ in trainable_parameters(model)}:
                raise ValueError("parameter names differ from the model's")
            copy_trainable(model, params)
            state = torch.load(self.dir / "optim.pt", weights_only=True, map_location="cpu")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if selection is not None and "selection" in meta:
                best = self.dir / "best.safetensors"
                selection.load(meta["selection"],
                               load_file(str(best)) if best.exists() else {})
            self.train_s = train_s
            self.loss = meta.get("loss")  # absent before 2026-11-27
        except Exception as exc:
            raise HarnessError(f"checkpoint {self.dir} is unreadable ({type(exc).__name__}: "
                               f"{str(exc)[:120]}); delete that folder to restart training") from None
        return step


def check_micro_batch_memory(model: nn.Module, cfg: TrainConfig, device: torch.device,
                             with_teacher: bool) -> None:
    """Fails fast, before the first step, when one micro-batch's logits cannot fit in memory.

    Logits, their log-softmax and gradient (and the teacher's logits) are
    ``tokens x vocab`` each; the estimate ignores everything else, so it only rejects
    requests that cannot fit, instead of waiting for an allocator failure or the OOM killer.

    Raises:
        HarnessError: the estimate exceeds the free memory of ``device``.
    """
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", 0)
    copies = 4 if with_teacher else 3
    need = cfg.batch_size * cfg.seq_len * int(vocab) * copies * (2 if device.type == "cuda" else 4)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = psutil.virtual_memory().available
    if need > free:
        raise HarnessError(
            f"train.batch_size={cfg.batch_size} x train.seq_len={cfg.seq_len} needs about "
            f"{need / 2**30:,.1f} GiB for the logits alone but {device.type} has "
            f"{free / 2**30:,.1f} GiB free; lower train.batch_size (raise train.grad_accum)")


def batch_at(data: torch.Tensor, step: int, micro: int, cfg: TrainConfig) -> torch.Tensor:
    """Deterministic batch for (step, micro): resumes see exactly the batches they would have."""
    n = data.size(0)
    start = ((step * cfg.grad_accum + micro) * cfg.batch_size) % n
    idx = torch.arange(start, start + cfg.batch_size) % n
    return data[idx]


def _forward(model, ids, hidden: bool):
    out = model(input_ids=ids, output_hidden_states=hidden, **no_cache(model))
    return out.logits[:, :-1], (out.hidden_states if hidden else None)


def batch_loss(model, teacher, objective: Objective, ids: torch.Tensor, amp) -> torch.Tensor:
    """The objective on one batch (student forward, teacher forward without gradients)."""
    with amp:
        logits, hidden = _forward(model, ids, objective.needs_hidden_states)
        t_logits = t_hidden = None
        if teacher is not None:
            with torch.no_grad():
                t_logits, t_hidden = _forward(teacher, ids, objective.needs_hidden_states)
        return objective.loss(ObjectiveInputs(
            student_logits=logits, labels=ids[:, 1:], teacher_logits=t_logits,
            student_hidden=hidden, teacher_hidden=t_hidden))


@torch.no_grad()
def holdout_loss(model, teacher, objective: Objective, held: torch.Tensor, batch_size: int,
                 device, amp) -> float:
    """The training objective over the held-out blocks, in eval mode: the mean of the batches'
    losses weighted by their sequences (the reference's Trainer.evaluate ``eval_loss``)."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), device=device)
        for lo in range(0, held.size(0), batch_size):
            ids = _to_device(held[lo : lo + batch_size], device)
            total += batch_loss(model, teacher, objective, ids, amp).float() * ids.size(0)
        return float(total) / held.size(0)
    finally:
        model.train(was_training)


class Selection:
    """Held-out loss every ``cfg.holdout_every`` steps and after the last; with
    ``cfg.select_best`` a host copy of the trainable weights of the step with the lowest loss
    (strictly lower: ties keep the earlier step, as the reference's Trainer), restored by
    :meth:`restore` when training ends."""

    def __init__(self, cfg: TrainConfig, held: torch.Tensor) -> None:
        self.cfg, self.held = cfg, held
        self.curve: list[tuple[int, float]] = []  # (step, held-out loss)
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.best_params: dict[str, torch.Tensor] = {}
        self.seconds = 0.0

    def due(self, step: int) -> bool:
        return step % self.cfg.holdout_every == 0 or step == self.cfg.steps

    def evaluate(self, step: int, model, teacher, objective: Objective, device, amp) -> None:
        t0 = time.perf_counter()
        loss = self.loss_of(model, teacher, objective, device, amp)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"held-out loss is {loss} at step {step}; lower the learning rate "
                f"(train.lr={self.cfg.lr}) or check the data, then rerun")
        self.curve.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            if self.cfg.select_best:
                self.best_params = self.snapshot(model)
        self.seconds += time.perf_counter() - t0
        log.info("step %d: held-out loss %.4f (best %.4f at step %d)", step, loss,
                 self.best_loss, self.best_step)

    def loss_of(self, model, teacher, objective: Objective, device, amp) -> float:
        """The held-out loss of the model as it is now."""
        return holdout_loss(model, teacher, objective, self.held, self.cfg.batch_size, device,
                            amp)

    def snapshot(self, model) -> dict[str, torch.Tensor]:
        """Host copies of the trainable weights, kept as the best step's."""
        return {n: p.detach().to("cpu", copy=True).contiguous()
                for n, p in trainable_parameters(model)}

    def restore(self, model) -> None:
        if self.cfg.select_best and self.best_params:
            copy_trainable(model, self.best_params)

    def record(self, recorder) -> None:
        if not self.curve:
            return
        recorder.metric("holdout_loss", self.best_loss, step=self.best_step,
                        curve=[[s, v] for s, v in self.curve],
                        selected=self.cfg.select_best)
        recorder.metric("holdout_loss_last", self.curve[-1][1], step=self.curve[-1][0])
        recorder.metric("best_step", self.best_step)
        recorder.metric("holdout_blocks", self.held.size(0))
        recorder.metric("holdout_eval_s_total", self.seconds)

    def state(self) -> dict:
        return {"curve": self.curve, "best_step": self.best_step,
                "best_loss": self.best_loss if self.curve else None, "seconds": self.seconds}

    def load(self, state: dict, best_params: dict[str, torch.Tensor]) -> None:
        self.curve = [(int(s), float(v)) for s, v in state["curve"]]
        self.best_step = state["best_step"]
        self.best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
        self.seconds = float(state.get("seconds", 0.0))
        self.best_params = best_params


def _batched_weights(model: nn.Module, device: torch.device) -> list:
    """Every layer's weight in one go per pass (harness.quant.batched) unless
    HARNESS_BATCHED_WEIGHTS=0: fake quantization on CUDA (one Triton launch per format),
    OneBit's effective weights on any device (multi-tensor ops). A speed switch, not part of
    the run's spec: values and gradients equal the per-layer path's bit for bit. On the H200
    the QAT step went from 1.48x (int2 g64) / 1.43x (NF3 g64) the plain step per layer to
    1.07x / 1.01x batched (docs/RESULTS.md, "GPU, second session")."""
    if os.environ.get("HARNESS_BATCHED_WEIGHTS", "1") == "0":
        return []
    hooks = [BatchedOneBit(model)]
    if device.type == "cuda":
        hooks.append(BatchedFakeQuant(model))
    return [h for h in hooks if h.layers]


_COMPILED: list[nn.Module] = []  # stacks compiled right now (tests look)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options() -> dict | None:
    """``torch.compile`` keywords from HARNESS_COMPILE: unset or 0 -> None (eager), 1 -> the
    default mode, or a mode's name (``reduce-overhead`` adds CUDA graphs on GPUs).

    Raises:
        HarnessError: any other value.
    """
    value = os.environ.get("HARNESS_COMPILE", "0").strip()
    if value in ("", "0"):
        return None
    if value == "1":
        return {}
    if value in COMPILE_MODES:
        return {"mode": value}
    raise HarnessError(f"HARNESS_COMPILE={value!r} is not 0, 1 or a torch.compile mode "
                       f"({', '.join(COMPILE_MODES)}); set one of those or unset it")


@contextmanager
def _compiled_decoders(*models: nn.Module | None):
    """With HARNESS_COMPILE set (:func:`compile_options`), ``torch.compile`` each model's decoder
    stack for the training loop only (eval and export see the plain modules again). A speed
    switch for GPUs, where a small model's step is bound by the host dispatching thousands of
    small kernels (on the H200 SmolLM2's plain step ran 58 ms of kernels in 107 ms); compiling
    costs a minute or more up front, so it pays only for long runs. The decoder stack rather
    than the whole model: the batching hooks sit on the outer model and stay eager. Values
    agree with eager to rounding.
    """
    stacks = _COMPILED
    options = compile_options()
    if options is not None:
        for m in models:
            stack = m.get_decoder() if m is not None and hasattr(m, "get_decoder") else None
            if isinstance(stack, nn.Module) and stack is not m:
                stack.compile(dynamic=False, **options)
                stacks.append(stack)
    try:
        yield
    finally:
        for stack in stacks:
            stack._compiled_call_impl = None  # what nn.Module.compile() set
        stacks.clear()


def _to_device(ids: torch.Tensor, device) -> torch.Tensor:
    # From pageable memory a copy to the GPU waits for the GPU to finish its queue, which
    # would stop the host dispatching once per step; a pinned copy does not.
    if torch.device(device).type == "cuda":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


def optimizer_step(model, teacher, objective: Objective, opt, params, batch_of, step: int,
                   cfg: TrainConfig, amp, workers: int = 1) -> torch.Tensor:
    """Dispatches one optimizer step over ``cfg.grad_accum`` micro-batches, ``batch_of(step,
    micro)`` giving this process's rows of each on the device (the whole micro-batch, or its
    share on one of ``workers``); returns the step's mean loss (x ``workers``: the caller
    all-reduces and divides) as a 0-d tensor without waiting for it (the caller reads it, and
    checks it is finite, while the next step runs: see :class:`_PendingLoss`).

    A share is taken in :func:`~harness.train.config.share_pieces` pieces (the same count on
    every worker, sized by the largest share, so FSDP's collectives stay in step), their
    gradients accumulated; each piece's loss is weighted by its rows x ``workers`` /
    ``batch_size`` (FSDP averages the workers' gradients), so the step is the global batch's
    mean however it was split. A piece left empty (a share shorter than the pieces) runs a
    forward weighted 0 on one row."""
    opt.zero_grad(set_to_none=True)
    pieces = share_pieces(-(-cfg.batch_size // workers), cfg.micro_batch)
    total = None
    for micro in range(cfg.grad_accum):
        ids = batch_of(step, micro)
        for piece in (torch.tensor_split(ids, pieces) if pieces > 1 else (ids,)):
            rows = piece.size(0)
            loss = batch_loss(model, teacher, objective, piece if rows else ids[:1], amp)
            part = loss.detach().float()
            if rows * workers != cfg.batch_size:  # else the plain mean, unchanged bit for bit
                weight = rows * workers / cfg.batch_size
                loss, part = loss * weight, part * weight
            (loss / cfg.grad_accum).backward()
            part = part / cfg.grad_accum
            total = part if total is None else total + part
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return total


def check_step_loss(value: float, step: int, cfg: TrainConfig) -> None:
    """Raises:
        TrainingDiverged: the loss of training step ``step`` is NaN or infinite."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {step}; lower the learning rate "
                               f"(train.lr={cfg.lr}) or check the data, then rerun")


class _PendingLoss:
    """The loss of the step dispatched last, read by the host one step later.

    Reading a loss waits for the GPU to finish computing it. Read right away, the host would
    stop dispatching for as long as the GPU takes to catch up, every step (the OneBit step on
    an H200 is bound by the host's dispatching); read after the next step is dispatched, the
    GPU always has that step queued. A NaN is therefore found one step late, when the weights
    have taken one more step: the run fails all the same, and :meth:`settle` runs before
    every checkpoint, so no checkpoint holds a step whose loss was not finite."""

    def __init__(self, cfg: TrainConfig, recorder) -> None:
        self.cfg, self.recorder = cfg, recorder
        self.step: tuple | None = None
        self.value = float("nan")  # the last loss read

    def settle(self) -> float:
        """Reads the pending step's loss: checks it, logs it; returns the last loss read.

        Raises:
            TrainingDiverged: the loss is NaN or infinite.
        """
        if self.step is not None:
            number, loss, lr, tps = self.step
            self.step = None
            value = loss.item()
            check_step_loss(value, number, self.cfg)
            self.value = value
            if number % self.cfg.log_every == 0 or number == self.cfg.steps:
                self.recorder.train_step(number, value, lr, tps)
        return self.value

    def replace(self, number: int, loss: torch.Tensor, lr: float, tps: float) -> None:
        self.step = (number, loss, lr, tps)


def train(model: nn.Module, objective: Objective, cfg: TrainConfig, ctx: RunContext,
          progress: bool = True) -> dict:
    """Minimises ``objective`` over ``cfg.steps`` optimizer steps; resumes from a checkpoint.
    With ``cfg.holdout`` the objective is also computed on the held-out slice of the data
    (:class:`Selection`); with ``cfg.select_best`` the model ends with the weights of the step
    where it was lowest.

    Returns:
        ``{"final_loss": ..., "steps": ..., "resumed_from": ..., "best_step": ...}``
        (``best_step`` None without a held-out slice).

    Raises:
        TrainingDiverged: the loss became NaN/inf (the run is marked failed).
    """
    device = ctx.device
    compile_options()  # a bad HARNESS_COMPILE fails the run before any work
    params = trainable_for(model, cfg)
    sharded = Path(ctx.run_dir) / SHARDED_CHECKPOINT_DIR
    if (sharded / "state.json").exists():
        raise HarnessError(f"{sharded} was written by training on several workers; rerun with "
                           f"--workers-per-run (any number) to resume it, or delete that folder")
    enable_grad_checkpointing(model, cfg)
    check_micro_batch_memory(model, cfg, device, objective.needs_teacher)
    data = ctx.train_batches(objective.data)
    selection = None
    if cfg.holdout:
        selection = Selection(cfg, ctx.train_batches(holdout_source(objective.data)))
    teacher = ctx.teacher() if objective.needs_teacher else None
    opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpt = Checkpointer(ctx.run_dir, ctx.spec.spec_hash() if hasattr(ctx.spec, "spec_hash")
                        else None)
    start = ckpt.load(model, opt, sched, selection) if ckpt.exists() else 0
    if hasattr(ctx.recorder, "resume_from"):
        # steps logged after the checkpoint (or, from 0, by an attempt killed before its first
        # checkpoint) are redone: drop their rows so the curve is this training's alone
        ctx.recorder.resume_from(start)
    if start:
        log.info("resuming training at step %d", start)
        ctx.recorder.metric("resumed_from_step", start)
    amp = training_autocast(device)
    model.train()
    bar = None
    if progress:
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {ctx.spec.method}", unit="step")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * (data.size(1) - 1)
    batched = _batched_weights(model, device)
    train_s = ckpt.train_s  # seconds in training steps before this invocation
    pending = _PendingLoss(cfg, ctx.recorder)

    def batch_of(step: int, micro: int) -> torch.Tensor:
        return _to_device(batch_at(data, step, micro, cfg), device)

    try:
        with (interrupts.deferred() as stop_requested,
              frozen_linears_in(teacher, autocast_dtype(device)),
              _compiled_decoders(model, teacher)):
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                lr = opt.param_groups[0]["lr"]
                if objective.on_step is not None:
                    objective.on_step(step)
                loss = optimizer_step(model, teacher, objective, opt, params, batch_of, step,
                                      cfg, amp)
                sched.step()
                pending.settle()  # the previous step's loss, while this one runs
                # Dispatch plus the wait for the step before: over the run, the wall time.
                seconds = time.perf_counter() - t0
                train_s += seconds
                tps = tokens_per_step / max(seconds, 1e-9)
                pending.replace(step + 1, loss, lr, tps)
                if selection is not None and selection.due(step + 1):
                    pending.settle()  # a NaN step fails as such, not as a held-out NaN
                    selection.evaluate(step + 1, model, teacher, objective, device, amp)
                stop = stop_requested()
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop:
                    pending.settle()
                    ckpt.save(step + 1, model, opt, sched, train_s, pending.value, selection)
                if bar is not None:
                    shown = {"loss": f"{pending.value:.4f}"} if step > start else {}
                    bar.set_postfix(**shown, tok_s=f"{tps:.0f}")  # loss: the step before
                    bar.update(1)
                if stop:  # also after the last step: the command was asked to stop
                    raise interrupts.stopped(stop, step + 1, cfg.steps)
    except Exception:
        # A crash in step n+1 leaves step n's row unwritten; log it if its loss is readable.
        with suppress(Exception):
            pending.settle()
        raise
    finally:
        for hooks in batched:
            hooks.remove()
    # a run resumed after its last step trained nothing new: its loss is the checkpoint's
    loss_value = pending.value if start < cfg.steps else ckpt.loss
    if bar is not None:
        bar.close()
    model.eval()
    if loss_value is not None:
        ctx.recorder.metric("final_train_loss", loss_value)
    ctx.recorder.metric("train_steps_s_total", train_s)
    best_step = None
    if selection is not None:
        selection.restore(model)
        selection.record(ctx.recorder)
        best_step = selection.best_step
    return {"final_loss": loss_value, "steps": cfg.steps, "resumed_from": start,
            "best_step": best_step}
