"""Training-step cost of fake quantization: plain step vs every decoder linear quantized, layer
by layer and batched (harness.quant.batched: one launch per pass for all layers; CUDA only).

    python bench/train_step.py                                   # SmolLM2, 8x1024 (GPU sizes)
    python bench/train_step.py --batch 2 --seq 256 --steps 3     # CPU-sized
    python bench/train_step.py --profile                         # + where the time goes
    python bench/train_step.py --shape-only                      # random weights, no model file

Variants run in the same process on the same input, alternating for --rounds rounds; the
fastest round of each counts (see interleaved).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from harness.models import load_model
from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears
from harness.train.autocast import training_autocast


def _step(model, ids, opt, amp) -> None:
    with amp:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_time(model, ids, steps: int, device, profile: bool = False) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = training_autocast(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _step(model, ids, opt, amp)  # warm-up: kernels compile, allocator fills
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        _step(model, ids, opt, amp)
    sync()
    mean = (time.perf_counter() - t) / steps
    if profile:
        print_profile(lambda: _step(model, ids, opt, amp), device)
    return mean


def print_profile(step, device, rows: int = 12) -> None:
    """One more ``step()`` under the profiler; prints the ops by self device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prof(activities=acts) as p:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=rows))


def smollm2_config():
    """SmolLM2-135M's architecture (its config.json), for benches that need no model file."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                       tie_word_embeddings=True)


def smollm2_shaped(device):
    """SmolLM2-135M with random weights: step time does not depend on the weights, and this
    needs no model file (the GPU machine's first call has none yet)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(smollm2_config()).to(device)


def interleaved(measure, names: list[str], rounds: int) -> dict[str, float]:
    """Runs ``measure(name, last_round)`` for every variant, ``rounds`` times in alternation
    (A B A B ...), prints each variant's times and returns its fastest.

    One pass in a fixed order biases the ratio: in a fresh process the first variant measured
    runs slower (on the CPU, the same folded OneBit step took 11.4 s first and 9.9 s after the
    paper variant), so the fastest of alternating rounds is compared.
    """
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            times[name].append(measure(name, r == rounds - 1))
    for name, ts in times.items():
        print(f"  {name:<20}{min(ts) * 1e3:9.1f} ms/step  (rounds: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in ts)})")
    return {n: min(ts) for n, ts in times.items()}


def step_bench_args() -> argparse.ArgumentParser:
    """The arguments every training-step bench takes (this one and bench/onebit_step.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating rounds over the variants; the fastest round counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="print a profiler table per variant")
    ap.add_argument("--shape-only", action="store_true",
                    help="SmolLM2-135M's shapes with random weights instead of --model")
    return ap


def bench_model(args, device):
    """``--model`` loaded, or SmolLM2's shapes with random weights for ``--shape-only`` (then
    ``args.model`` is renamed to say so)."""
    if args.shape_only:
        args.model = "smollm2-135m-shaped (random weights)"
        return smollm2_shaped(device)
    return load_model(args.model, device=device)[0]


def main() -> None:
    ap = step_bench_args()
    ap.add_argument("--fmt", default="int")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    device = torch.device(args.device)
    base = bench_model(args, device)
    base.train()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    q = QuantFormat(fmt=args.fmt, bits=args.bits, group_size=args.group_size)
    label = f"{args.fmt if args.fmt == 'nf3' else args.fmt + str(args.bits)} g{args.group_size}"
    models = {"plain": base}
    for variant in ["per-layer"] + (["batched"] if device.type == "cuda" else []):
        quant = copy.deepcopy(base)
        replace_linears(quant, decoder_linear_names(quant),
                        lambda _n, lin: QuantLinear.from_linear(lin, q))
        if variant == "batched":
            from harness.quant.batched import BatchedFakeQuant

            BatchedFakeQuant(quant)
        models[f"{label} {variant}"] = quant
    print(f"{args.model} batch {args.batch}x{args.seq} on {device}, {args.steps} steps per "
          f"round, {args.rounds} rounds")
    best = interleaved(lambda name, last: step_time(models[name], ids, args.steps, device,
                                                    args.profile and last),
                       list(models), args.rounds)
    for name in list(models)[1:]:
        print(f"  {name} / plain: {best[name] / best['plain']:.2f}x")

if __name__ == "__main__":
    main()
