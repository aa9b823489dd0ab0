"""Peak-memory estimate of a planned run, from the model's config alone (no weights loaded).

``harness run ... --dry-run`` prints, per planned run, the estimated peak memory of one device
(one worker) and whether it fits; a run that does not fit is refused in one line naming the
ways out. The estimate is the largest of three phases plus a fixed runtime term:

* ``prepare`` (post-training methods with calibration data: gptq, awq, clip): weights +
  one decoder block's calibration inputs/outputs and MLP intermediates, + GPTQ's Hessians of
  one block.
* ``train`` (methods with a training objective): weights + gradients + AdamW + teacher +
  fake-quantized weights saved for backward + activations + logits (see :func:`estimate`).
* ``eval``: weights (+ the teacher, which the run keeps until it ends) + one perplexity
  window's logits and its log-softmax + one layer's attention scores and MLP intermediates.

Sizes follow what the code holds (``harness/train/trainer.py``, ``autocast.py``,
``losses.py``, ``eval/ppl.py``): the model is loaded in float32; the GPU trains under bf16
autocast (activations 2 bytes, fp32 master weights, gradients and AdamW state); the frozen
teacher's linears are cast to bf16 on the GPU (its embedding stays fp32); the CPU trains in
float32. Several workers (FSDP, ``harness/train/distributed.py``) shard the training's weights,
gradients and AdamW state and split each micro-batch; the teacher is a whole copy per worker,
or sharded like the model where a whole copy does not fit (:func:`plan_teacher`), and prepare
and eval see the whole model in the run's own process. On the CPU the process keeps the heap
it frees, so evaluation's buffers count on top of the earlier phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.train.config import share_pieces

GiB = 1 << 30

#: Process memory that is no tensor of the run on the CPU: the Python/torch/transformers/
#: lm-eval runtime, the tokenizer, the data, glibc's retained heap (``harness.host_memory``) and
#: lm-eval's batches. Calibrated ONCE on the finished SmolLM2 ``fp`` run of a baseline database
#: (measured peak_rss_mb 2,857.9 MB minus this module's tensor estimate for that run, 1,461 MB); every
#: other run is a check of the estimate, not a fit (docs/RESULTS.md, "The memory plan against
#: measured peaks").
CPU_RUNTIME_BYTES = 1397 * 2**20
#: CUDA context and allocator slack on a GPU: an assumption (not measured here).
GPU_RUNTIME_BYTES = 1 * GiB

#: logits-sized [tokens x vocab] tensors alive at a training step's peak, besides the student's
#: (and teacher's) logits themselves, which are ``act_bytes`` each: CE keeps the log-softmax and
#: makes its gradient (2 fp32); the distillation losses (``_KLPair``) keep both log-softmaxes
#: and build the probabilities, their difference and the gradient (5 fp32).
LOSS_FP32_COPIES = {"ce": 2, "kd": 5}

#: Bytes per quantized weight that a training-form layer keeps for its backward on the CPU (the
#: latent weight itself not counted), by its weight format: grouped and scaled copies, codes
#: and masks of the fake-quantization autograd functions (measured with ``saved_tensors_hooks``
#: on one layer; tests/core/test_memory_plan.py measures them again). A format not listed (a plugin's) counts
#: :data:`DEFAULT_SAVED_BYTES`. On a GPU the fused kernels keep less: the estimate assumes one
#: bf16 copy there (not measured).
SAVED_BYTES_PER_WEIGHT = {"int": 12.14, "nf3": 5.25, "intfz": 24.31, "ternary": 4.0,
                          "binary": 4.19}
DEFAULT_SAVED_BYTES = 4.0


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a llama-style decoder that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(vocab=int(config.vocab_size), hidden=hidden,
                   layers=int(config.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), intermediate=int(config.intermediate_size),
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   attention_bias=bool(getattr(config, "attention_bias", False)),
                   mlp_bias=bool(getattr(config, "mlp_bias", False)))

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """lm_head's own parameters (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_linear_params(self) -> int:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        return attn + mlp

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # + two RMSNorm gains

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder linears (what the methods quantize)."""
        return self.layers * self.layer_linear_params

    @property
    def params(self) -> int:
        """Every parameter, a tied embedding/lm_head counted once (``model.parameters()``)."""
        return (self.embedding_params + self.head_params + self.layers * self.layer_params
                + self.hidden)  # final norm

    def trainable_params(self, trainable: str) -> int:
        if trainable == "all":
            return self.params
        return self.params - self.embedding_params - self.head_params


def model_shape(name: str) -> ModelShape:
    """The shape of ``name`` from its config only. A local folder needs nothing but
    ``config.json``; the embedded ``smollm2-135m``/``tiny-llama`` read the converted checkpoint's
    config / the tokenizer (converting the GGUF once if the cache is empty, which loads it)."""
    from harness.models import model_config

    return ModelShape.from_config(model_config(name))


# ----------------------------------------------------------------------------- estimate


@dataclass
class Estimate:
    """Bytes per device of one run at its peak phase, component by component."""

    workers: int
    device_type: str
    phase: str  # the phase whose total is the peak: prepare, train or eval
    components: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def where(self) -> str:
        """The phase of the peak and the process that reaches it: with workers, training is
        theirs (each worker's share), every other phase the run's own process's."""
        if self.workers > 1:
            return f"{self.phase}, {'each worker' if self.phase == 'train' else 'run process'}"
        return self.phase


def layer_activation_bytes(shape: ModelShape, tokens: int, act_bytes: int) -> int:
    """Bytes one decoder layer saves for backward, for ``tokens`` tokens.

    Per token: the two residual-stream inputs of the RMSNorms and the two normalized
    tensors (fp32 in HF's RMSNorm, whatever the autocast: 4 x 4h bytes); in ``act_bytes``
    (4 fp32 / 2 bf16 autocast): the two norm outputs fed to the linears (2h), the rotated
    query (q) and key (kv) and the value (kv) kept by attention, its output and the
    o_proj input (2q), gate, up, SiLU(gate) and their product (4i). Attention's own
    log-sum-exp (heads floats per token) is negligible and left out.
    """
    h, q, kv, i = (shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim,
                   shape.intermediate)
    per_token = 16 * h + act_bytes * (2 * h + 3 * q + 2 * kv + 4 * i)
    return tokens * per_token


def _train_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``train`` section of a run's config (None: the method does not train)."""
    train = config.get("train")
    return train if isinstance(train, dict) else None


def estimate(shape: ModelShape, method: str, config: dict[str, Any], *, eval_seq_len: int,
             teacher: bool = False, calibration: tuple[int, int] | None = None,
             device_type: str = "cpu", workers: int = 1,
             grad_checkpointing: bool | None = None, fmt: str | None = None,
             teacher_shard: bool | None = None) -> Estimate:
    """Estimated peak bytes of one device for one run.

    Args:
        shape: the model (:func:`model_shape`).
        method: the method's name; ``config`` its config (``spec.config``), whose ``train``
            (when present and the method trains) gives batch_size, seq_len, trainable.
        eval_seq_len: the perplexity window.
        teacher: the method runs a frozen teacher (``Method.needs().teacher_model``).
        calibration: ``(samples, seq_len)`` of calibration data, if the method reads some.
        device_type: ``cpu`` or ``cuda``.
        workers: FSDP workers of the run: weights, gradients and AdamW are sharded by it, and
            each micro-batch is split over them (the teacher is a whole copy per worker unless
            sharded).
        grad_checkpointing: None: ``train.grad_checkpointing`` of the config (False if absent).
        teacher_shard: None: ``train.teacher_shard`` of the config (False if absent); only
            with several workers.
        fmt: the weight format its layers train in (the method's resolved ``fmt``); None: the
            method does not quantize weights.
    """
    gpu = device_type == "cuda"
    act = 2 if gpu else 4
    w = max(1, int(workers))
    P = shape.params
    c: dict[str, int] = {}
    phases: dict[str, int] = {}
    full = P * 4  # float32; prepare, finalize and eval see the whole model on one device
    c["weights"] = full
    whole_teacher = 0
    if teacher:
        if gpu:  # frozen linears cast to bf16 (autocast.frozen_linears_in), embedding fp32
            whole_teacher = shape.embedding_params * 4 + (P - shape.embedding_params) * 2
        else:
            whole_teacher = P * 4
    c["teacher"] = whole_teacher

    train = _train_of(config)
    if teacher_shard is None:
        teacher_shard = bool(train and train.get("teacher_shard"))
    if teacher and train is not None and w > 1 and teacher_shard and gpu:
        # fp32 shards (FSDP2 holds them: no bf16 copies), each layer gathered whole around its
        # forward and the next one's gather in flight. On the CPU rank 0 (the largest worker)
        # loads the whole teacher on its host and broadcasts it: that peak stays.
        c["teacher"] = math.ceil(P * 4 / w) + 2 * shape.layer_params * 4
    if train is not None:
        trainable = shape.trainable_params(train.get("trainable", "non_embedding"))
        ckpt = train.get("grad_checkpointing", False) if grad_checkpointing is None \
            else grad_checkpointing
        # the configured batch is the global one: each worker's micro-batch is its share,
        # taken in pieces of at most train.micro_batch sequences
        share = math.ceil(int(train["batch_size"]) / w)
        tokens = math.ceil(share / share_pieces(share, train.get("micro_batch"))) \
            * int(train["seq_len"])
        c["weights"] = math.ceil(full / w)  # training alone is sharded
        if w > 1 and not gpu:
            # rank 0 reads the whole prepared weights from the file the run's process wrote
            # and broadcasts them (harness.train.model_transfer): the largest worker holds them
            # once besides its shards. On a GPU the shards alone reach the device.
            c["weights"] += full
        c["grads"] = math.ceil(trainable * 4 / w)
        c["adamw"] = math.ceil(trainable * 8 / w)
        extra = 0
        if fmt is not None:  # what each quantized layer saves for its backward
            per_weight = act if gpu else SAVED_BYTES_PER_WEIGHT.get(fmt, DEFAULT_SAVED_BYTES)
            extra += math.ceil(shape.linear_params * per_weight)
        if gpu:  # autocast's bf16 copies of the trainable linears, within the step
            extra += math.ceil(shape.linear_params * 2 / w)
        c["fake_quant"] = extra
        per_layer = layer_activation_bytes(shape, tokens, act)
        if ckpt:  # one residual per layer kept, one layer's activations recomputed at a time
            acts = shape.layers * tokens * shape.hidden * 4 + per_layer
        else:
            acts = shape.layers * per_layer
        if method == "onebit":  # hidden states of both models, stacked in fp32 for the MSE
            acts += 3 * (shape.layers + 1) * tokens * shape.hidden * 4
        c["activations"] = acts
        # a run with a teacher distils (KD-style losses), one without trains on cross-entropy
        models, kind = (2, "kd") if teacher else (1, "ce")
        c["logits"] = tokens * shape.vocab * (models * act + 4 * LOSS_FP32_COPIES[kind])
        phases["train"] = (c["weights"] + c["teacher"] + c["grads"] + c["adamw"] + extra
                           + acts + c["logits"])
        if method == "bitdistiller" and config.get("gamma") in ("paper", "code"):
            # estimate_gamma takes the fp32 teacher's (outside training autocast) logits of
            # one batch at a time, + their log-softmax; in the run's own process, whole
            # batches (not a worker's share). With GPU workers the student waits in host
            # memory meanwhile (runner._park_on_host)
            c["gamma"] = 2 * int(train["batch_size"]) * int(train["seq_len"]) * shape.vocab * 4
            student = 0 if gpu and w > 1 else full
            phases["objective"] = student + P * 4 + c["gamma"]
    else:
        c.update(grads=0, adamw=0, fake_quant=0, activations=0, logits=0)
    c.setdefault("gamma", 0)
    if calibration is not None and train is None:
        samples, seq = calibration
        t = samples * seq
        h, i = shape.hidden, shape.intermediate
        calib = t * (2 * h + 2 * i) * 4  # a block's inputs, outputs, one MLP's intermediates
        if method == "gptq":  # H = 2 X^T X / n per linear of one block
            calib += (6 * h * h + i * i) * 4
        c["calibration"] = calib
        phases["prepare"] = full + calib
    else:
        c["calibration"] = 0
    T, V = eval_seq_len, shape.vocab
    # logits + log_softmax (fp32), one layer's attention scores (CPU SDPA without a fused
    # kernel for the mask) and MLP intermediates: no_grad, transient
    c["eval"] = 2 * T * V * 4 + shape.heads * T * T * 4 + 3 * T * shape.intermediate * 4
    if fmt is not None and not gpu:
        # packed layers keep their dequantized fp32 weight while evaluating; on a GPU each
        # reuses the block of the latent weight it replaced (the caching allocator), on the
        # CPU the freed latents stay in the process's heap (measured: docs/RESULTS.md)
        c["eval"] += shape.linear_params * 4
    # the run's own process evaluates; with workers it did not train (the workers did)
    before = max((v for k, v in phases.items() if not (k == "train" and w > 1)), default=0)
    # with workers this process let its teacher go before they trained
    phases["eval"] = full + (whole_teacher if train is None or w == 1 else 0) + c["eval"]
    if not gpu:
        if train is not None and w > 1:
            # it wrote the prepared weights for the workers: safetensors serializes them
            # through a host copy, whose freed pages the retained heap keeps
            phases["eval"] += full
        # harness.host_memory keeps the heap a process frees (for speed), and evaluation's
        # buffers land on top of what the earlier phases left: measured, a trained SmolLM2
        # run's RSS rose by about the eval term after training (docs/RESULTS.md)
        phases["eval"] = max(phases["eval"], before + c["eval"])
    runtime = GPU_RUNTIME_BYTES if gpu else CPU_RUNTIME_BYTES
    c["runtime"] = runtime
    phases = {k: v + runtime for k, v in phases.items()}
    peak = max(phases, key=phases.get)
    return Estimate(workers=w, device_type=device_type, phase=peak, components=c, phases=phases)


# ----------------------------------------------------------------------------- runs


def estimate_spec(spec, shape: ModelShape, device_type: str = "cpu", workers: int = 1,
                  **overrides) -> Estimate:
    """:func:`estimate` for a planned :class:`~harness.config.RunSpec`."""
    from harness.registry import build_method

    method = build_method(spec)
    needs = method.needs()
    has_objective = "train" in type(method.config).model_fields
    config = dict(spec.config)
    if not has_objective:
        config.pop("train", None)
    calib = needs.calibration
    fmt = getattr(method.config, "fmt", None) if method.quantizes else None
    return estimate(shape, spec.method, config, eval_seq_len=spec.eval.seq_len, fmt=fmt,
                    teacher=bool(needs.teacher_model),
                    calibration=(calib.samples, calib.seq_len) if calib else None,
                    device_type=device_type, workers=workers, **overrides)


def device_memory(device: str | None, given_gib: float | None) -> tuple[str, int, str]:
    """``(device type, bytes, where the number came from)``: ``--device-mem`` if given, else
    the GPU's total memory, else the machine's total RAM."""
    import torch

    dev = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if given_gib is not None:
        return dev.type, int(given_gib * GiB), "--device-mem"
    if dev.type == "cuda":
        _free, total = torch.cuda.mem_get_info(dev)
        return "cuda", int(total), torch.cuda.get_device_name(dev)
    try:
        import psutil

        return dev.type, int(psutil.virtual_memory().total), "RAM (psutil)"
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return dev.type, int(line.split()[1]) * 1024, "RAM (/proc/meminfo)"
    raise RuntimeError("cannot tell this machine's memory; pass --device-mem GB")


def _fitting_pieces(spec, shape: ModelShape, device_type: str, workers: int,
                    device_bytes: int) -> tuple[Any, int, Estimate] | None:
    """``(spec with train.micro_batch=m, m, its estimate)`` for the largest piece size ``m``
    below the spec's own that fits ``device_bytes``; None when even 1 sequence does not."""
    train = _train_of(spec.config)
    share = math.ceil(int(train["batch_size"]) / workers)
    now = min(share, int(train.get("micro_batch") or share))
    for m in (m for m in piece_sizes(share) if m < now):
        pieces = _with_train(spec, micro_batch=m)
        est = estimate_spec(pieces, shape, device_type, workers)
        if est.total <= device_bytes:
            return pieces, m, est
    return None


def _with_train(spec, **train_updates):
    train = _train_of(spec.config)
    return spec.model_copy(update={"config": {**spec.config, "train": {**train,
                                                                        **train_updates}}})


def plan_teacher(spec, shape: ModelShape, device_type: str, workers: int,
                 device_bytes: int) -> tuple[Any, bool]:
    """``(spec, whether the plan sharded its teacher)``: a training run on several workers that
    leaves ``train.teacher_shard`` unset gets it set when a whole teacher per worker does not
    fit the device and the shards need less (the same teacher outputs, not in the run key).
    Every other spec comes back as it is."""
    train = _train_of(spec.config)
    if train is None or workers < 2 or train.get("teacher_shard") is not None:
        return spec, False
    whole = estimate_spec(spec, shape, device_type, workers)
    if not whole.components["teacher"] or whole.total <= device_bytes:  # no teacher, or fits
        return spec, False
    sharded = _with_train(spec, teacher_shard=True)
    if estimate_spec(sharded, shape, device_type, workers).total >= whole.total:
        return spec, False  # the CPU: rank 0 loads the whole teacher to broadcast it
    return sharded, True


def fit_to_device(specs, device: str | None, device_mem_gib: float | None,
                  workers: int = 1) -> tuple[list, list[str]]:
    """The runs to start, each training run fitted to the device by the same-result changes
    (not in the run key) and one line announcing each: on several workers a teacher sharded
    where a whole one per worker does not fit (:func:`plan_teacher`); then, where the whole
    share of a micro-batch still does not fit (and no ``train.micro_batch`` is set), the largest
    pieces that do (pieces accumulate their gradients). A model without a config to plan from
    is left as it is (loading it says what is missing)."""
    from harness.errors import HarnessError

    def plannable(spec) -> bool:
        train = _train_of(spec.config)
        return train is not None and (not train.get("micro_batch") or (
            workers > 1 and train.get("teacher_shard") is None))

    if not any(plannable(s) for s in specs):  # nothing to plan: the device is not asked
        return list(specs), []
    device_type, device_bytes, source = device_memory(device, device_mem_gib)
    where = f"{device_type} ({_gib(device_bytes)} GiB, {source})"
    shapes: dict[str, ModelShape | None] = {}
    out, notes = [], []
    for spec in specs:
        out.append(spec)
        if not plannable(spec):
            continue
        if spec.model not in shapes:
            try:
                shapes[spec.model] = model_shape(spec.model)
            except HarnessError:
                shapes[spec.model] = None
        shape = shapes[spec.model]
        if shape is None:
            continue
        spec, sharded = plan_teacher(spec, shape, device_type, workers, device_bytes)
        if sharded:
            out[-1] = spec
            notes.append(f"run {spec.run_key} ({spec.method}): a whole teacher on each of the "
                         f"{workers} workers does not fit {where}; the teacher is sharded over "
                         f"them (train.teacher_shard=true, the same result)")
        if (_train_of(spec.config).get("micro_batch")
                or estimate_spec(spec, shape, device_type, workers).total <= device_bytes):
            continue
        fitted = _fitting_pieces(spec, shape, device_type, workers, device_bytes)
        if fitted is not None:
            out[-1], m, _ = fitted
            notes.append(f"run {spec.run_key} ({spec.method}): its share of each micro-batch "
                         f"does not fit {where}; training takes it in pieces of {m} "
                         f"sequence(s) (train.micro_batch={m}, the same result)")
    return out, notes


def piece_sizes(share: int) -> list[int]:
    """The distinct sizes of the pieces a share of ``share`` sequences can be taken in, largest
    first, below the whole share (2 pieces, 3 pieces, ...: 8 -> 4, 3, 2, 1)."""
    return sorted({math.ceil(share / k) for k in range(2, share + 1)}, reverse=True)


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


COLUMNS = ("run", "method", "workers", "weights", "grads", "adamw", "teacher", "fake_quant",
           "activations", "logits", "gamma", "calibration", "eval", "runtime", "peak (phase)",
           "device", "fits")


def plan_table(rows: list[tuple[Any, Estimate, Estimate | None]], device_bytes: int) -> str:
    """One line per run: its components (a teacher sharded over the workers marked), its peak,
    and (training runs) the activations and the peak with activation checkpointing
    (``train.grad_checkpointing=true``)."""
    from harness.report import table

    out = []
    for spec, est, ckpt in rows:
        c = est.components
        sharded = est.workers > 1 and (_train_of(spec.config) or {}).get("teacher_shard")
        out.append([spec.run_key, spec.method, est.workers,
                    *(_gib(c[k]) + (" sharded" if k == "teacher" and sharded and c[k] else "")
                      for k in COLUMNS[3:14]),
                    f"{_gib(est.total)} ({est.where})",
                    "-" if ckpt is None else _gib(ckpt.components["activations"]),
                    "-" if ckpt is None else f"{_gib(ckpt.total)} ({ckpt.where})",
                    _gib(device_bytes), "yes" if est.total <= device_bytes else "NO"])
    return table(list(COLUMNS[:3]) + [f"{k} GiB" for k in COLUMNS[3:14]]
                 + ["peak GiB (phase)", "activations ckpt GiB", "peak ckpt GiB (phase)",
                    "device GiB", "fits"], out)


def ways_out(spec, shape: ModelShape, device_type: str, workers: int, device_bytes: int) -> str:
    """The options that would make ``spec`` fit, each with its estimate."""
    opts = []
    train = _train_of(spec.config)
    flag = "--gpus-per-run" if device_type == "cuda" else "--workers-per-run"
    if train is not None:  # only training is sharded over workers
        for n in (2, 4, 8, 16, 32, 64):
            if n > workers:
                est = estimate_spec(plan_teacher(spec, shape, device_type, n, device_bytes)[0],
                                    shape, device_type, n)
                if est.total <= device_bytes:
                    opts.append(f"more workers ({flag} {n}: {_gib(est.total)} GiB each)")
                    break
        else:
            opts.append("more workers (not enough even at 64)")
        est = estimate_spec(spec, shape, device_type, workers, grad_checkpointing=True)
        opts.append(f"--set train.grad_checkpointing=true ({_gib(est.total)} GiB)")
        fitted = _fitting_pieces(spec, shape, device_type, workers, device_bytes)
        if fitted is not None:
            _, m, est = fitted
            opts.append(f"smaller pieces of each micro-batch, the same result (--set "
                        f"train.micro_batch={m}: {_gib(est.total)} GiB)")
        else:
            opts.append("smaller pieces of each micro-batch via train.micro_batch (not enough "
                        "even at 1 sequence)")
    else:
        opts.append("a shorter evaluation window (--seq-len)")
    return "; ".join(opts)


def dry_run(specs, device: str | None, device_mem_gib: float | None, workers: int = 1,
            shapes: dict[str, ModelShape] | None = None) -> str:
    """The table of every run's estimate; raises when one does not fit.

    Raises:
        HarnessError: a run's estimate exceeds the device memory (one line: the run, its
            estimate, the device's memory, and the options with their estimates).
    """
    from harness.errors import HarnessError

    device_type, device_bytes, source = device_memory(device, device_mem_gib)
    shapes = dict(shapes or {})
    rows = []
    for spec in specs:
        if spec.model not in shapes:
            shapes[spec.model] = model_shape(spec.model)
        shape = shapes[spec.model]
        spec, _ = plan_teacher(spec, shape, device_type, workers, device_bytes)  # as a run would
        ckpt = None if _train_of(spec.config) is None else \
            estimate_spec(spec, shape, device_type, workers, grad_checkpointing=True)
        rows.append((spec, estimate_spec(spec, shape, device_type, workers), ckpt))
    too_big = [(s, e) for s, e, _ in rows if e.total > device_bytes]
    # name a training run first when there is one: it has every option
    too_big.sort(key=lambda se: _train_of(se[0].config) is None)
    if too_big:
        spec, est = too_big[0]
        more = f" (and {len(too_big) - 1} more run(s))" if len(too_big) > 1 else ""
        raise HarnessError(
            f"run {spec.run_key} ({spec.method}) needs about {_gib(est.total)} GiB per device "
            f"at its peak ({est.where}) with {est.workers} worker(s) but {device_type} has "
            f"{_gib(device_bytes)} GiB ({source}){more}; options: "
            f"{ways_out(spec, shapes[spec.model], device_type, workers, device_bytes)}")
    note = (f"Estimated peak memory per device ({device_type}, {_gib(device_bytes)} GiB from "
            f"{source}); no weights loaded, nothing run or stored.")
    return note + "\n" + plan_table(rows, device_bytes)
