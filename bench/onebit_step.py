"""OneBit training-step cost: the layer as the paper writes it (``((x * g) @ sign(W)^T) * h``,
op by op) vs the folded layer (``x @ ((h g^T) * sign(W))^T``, one autograd node for the
weight) vs the folded layer batched (every layer's weight in one node, harness.quant.batched,
what the trainer uses), inside the trainer's step: teacher forward, student forward, KD + hidden-state loss,
backward, AdamW. Opt-in ``compiled``: batched with both decoder stacks ``torch.compile``'d, as
the trainer does under HARNESS_COMPILE=1 (the first step's compile time is printed apart).

    python bench/onebit_step.py                                 # SmolLM2, 8x1024 (GPU sizes)
    python bench/onebit_step.py --batch 4 --seq 256 --steps 2   # CPU-sized
    python bench/onebit_step.py --shape-only --profile          # random weights, + profiles
    python bench/onebit_step.py --shape-only --batch 1 --seq 16 --steps 1 --count-ops
    python bench/onebit_step.py --shape-only --variants batched,compiled   # is compiling worth it

The variants run in the same process on the same input and weights, alternating for
``--rounds`` rounds; the fastest round of each counts (see train_step.interleaved).
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import bench_model, interleaved, print_profile, step_bench_args

from harness.api import ObjectiveInputs
from harness.quant.batched import BatchedOneBit
from harness.quant.modules import decoder_linear_names, replace_linears
from harness.quant.onebit import OneBitLinear
from harness.train.autocast import autocast_dtype, frozen_linears_in, training_autocast
from harness.train.config import TrainConfig
from harness.train.trainer import _compiled_decoders, _forward, _optimizer_step, optimizer_groups
from methods.onebit import OneBit


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


# The method's own objective (default config: KD + hidden states, the paper's weighting).
OBJECTIVE = OneBit().objective(None)


def forward_backward(student, teacher, ids, device) -> torch.Tensor:
    """The trainer's micro-step: its forwards under its autocast, OneBit's loss, backward."""
    with training_autocast(device):
        logits, hidden = _forward(student, ids, hidden=True)
        with torch.no_grad():
            t_logits, t_hidden = _forward(teacher, ids, hidden=True)
        loss = OBJECTIVE.loss(ObjectiveInputs(
            student_logits=logits, labels=ids[:, 1:], teacher_logits=t_logits,
            student_hidden=hidden, teacher_hidden=t_hidden))
    loss.backward()
    return loss


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops dispatched (views and detaches aside: they launch no kernel)."""

    FREE = frozenset({"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand",
                      "slice", "select", "permute", "detach", "alias", "split",
                      "split_with_sizes", "reshape", "as_strided"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(student, teacher, ids, device) -> int:
    """ATen ops of one forward + backward (the optimizer left out: its count depends on the
    device's foreach support, not on the layer)."""
    forward_backward(student, teacher, ids, device)  # warm-up: lazily built state
    student.zero_grad(set_to_none=True)
    with _CountOps() as counter:
        forward_backward(student, teacher, ids, device)
    student.zero_grad(set_to_none=True)
    return counter.count


def step_time(student, teacher, ids, steps: int, device, profile: bool) -> tuple[float, float]:
    """Seconds per step of the trainer's own step (``_optimizer_step``: the batch copied from
    the host, both forwards, OneBit's loss, backward, clipping at the default 1.0, AdamW), each
    loss read after the next step is dispatched, as the trainer reads them; and peak MB."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(optimizer_groups(student, 0.01), lr=1e-5, betas=(0.9, 0.98),
                            weight_decay=0.01)  # the trainer's groups: norms not decayed
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = TrainConfig(steps=steps, batch_size=ids.size(0), seq_len=ids.size(1))
    data, amp = ids.cpu(), training_autocast(device)

    def step():
        return _optimizer_step(student, teacher, OBJECTIVE, opt, params, data, 0, cfg, device,
                               amp)

    step().item()  # warm-up
    sync()
    _peak_reset(device)
    t0 = time.perf_counter()
    last = None
    for _ in range(steps):
        loss = step()
        if last is not None:
            last.item()  # the trainer reads each loss after dispatching the next step
        last = loss
    sync()
    mean = (time.perf_counter() - t0) / steps
    peak = _peak_mb(device)
    if profile:
        print_profile(step, device, rows=15)
    return mean, peak


def main() -> None:
    ap = step_bench_args()
    ap.add_argument("--count-ops", action="store_true",
                    help="also count the ATen ops one forward + backward dispatches per variant")
    ap.add_argument("--variants", default="paper,folded,batched",
                    help="comma list of paper, folded, batched, compiled")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of the compiled variant (e.g. reduce-overhead)")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"paper", "folded", "batched", "compiled"}
    if unknown or not variants:
        ap.error(f"unknown variants {sorted(unknown)}; use paper, folded, batched, compiled")
    device = torch.device(args.device)
    teacher = bench_model(args, device)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    # SVID's NMF rounds do not change the step's cost: a few are enough here.
    replace_linears(student, decoder_linear_names(student),
                    lambda _n, lin: OneBitLinear.from_linear(lin, iters=5))
    student.get_input_embeddings().requires_grad_(False)
    student.get_output_embeddings().requires_grad_(False)
    student.train()
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), device=device)
    print(f"{args.model} OneBit step (teacher + student + KD/hidden loss + AdamW), "
          f"batch {args.batch}x{args.seq} on {device}, {args.steps} steps per round, "
          f"{args.rounds} rounds")
    layers = [m for m in student.modules() if isinstance(m, OneBitLinear)]
    peaks, ops = {}, {}
    # the trainer's own switch: HARNESS_COMPILE names the mode _compiled_decoders compiles with
    os.environ["HARNESS_COMPILE"] = "1" if args.compile_mode == "default" else args.compile_mode
    timed_compile: list[float] = []  # the compiled variant's first step, which compiles

    def measure(variant: str, last: bool) -> float:
        for m in layers:  # instance attribute: the class's forward stays the folded one
            m.forward = m.reference_forward if variant == "paper" else OneBitLinear.forward.__get__(m)
        hooks = BatchedOneBit(student) if variant in ("batched", "compiled") else None
        compiling = (_compiled_decoders(student, teacher) if variant == "compiled"
                     else nullcontext())
        try:
            # as the trainer: the teacher's linears held in autocast's dtype for the loop
            with compiling, frozen_linears_in(teacher, autocast_dtype(device)):
                if variant == "compiled" and not timed_compile:
                    t0 = time.perf_counter()
                    forward_backward(student, teacher, ids, device)
                    student.zero_grad(set_to_none=True)
                    timed_compile.append(time.perf_counter() - t0)
                    print(f"  compiled ({args.compile_mode}): first step (compiling) "
                          f"{timed_compile[0]:.1f} s")
                if args.count_ops and last and variant != "compiled":  # (a dispatch mode
                    ops[variant] = count_ops(student, teacher, ids, device)  # turns compile off)
                mean, peaks[variant] = step_time(student, teacher, ids, args.steps, device,
                                                 args.profile and last)
        finally:
            if hooks is not None:
                hooks.remove()
        return mean

    best = interleaved(measure, variants, args.rounds)
    if device.type == "cuda":
        print("  peak GPU memory: " + ", ".join(f"{v} {peaks[v]:.0f} MB" for v in variants))
    if ops:
        print("  ATen ops per forward + backward (views aside): "
              + ", ".join(f"{v} {ops[v]:,}" for v in variants if v in ops))
    for v in variants[1:]:
        print(f"  {v} / {variants[0]}: {best[v] / best[variants[0]]:.2f}x")

if __name__ == "__main__":
    main()
