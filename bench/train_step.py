"""Training-step cost of fake quantization: plain step vs every decoder linear quantized, layer
by layer and batched (harness.quant.batched: one launch per pass for all layers; CUDA only).

    python bench/train_step.py                                   # SmolLM2, 8x1024 (GPU sizes)
    python bench/train_step.py --batch 2 --seq 256 --steps 3     # CPU-sized
    python bench/train_step.py --profile                         # + where the time goes
    python bench/train_step.py --shape-only                      # random weights, no model file

Each line is measured in the same process, one after another, on the same input.
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import nullcontext

import torch

from harness.models import load_model
from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears


def _step(model, ids, opt, amp) -> None:
    with amp:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_time(model, ids, steps: int, device, profile: bool = False) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _step(model, ids, opt, amp)  # warm-up: kernels compile, allocator fills
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        _step(model, ids, opt, amp)
    sync()
    mean = (time.perf_counter() - t) / steps
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof(activities=acts) as p:
            _step(model, ids, opt, amp)
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=12))
    return mean


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fmt", default="int")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="print a profiler table per variant")
    ap.add_argument("--shape-only", action="store_true",
                    help="SmolLM2-135M's shapes with random weights instead of --model")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.shape_only:
        base, args.model = smollm2_shaped(device), "smollm2-135m-shaped (random weights)"
    else:
        base, _ = load_model(args.model, device=device)
    base.train()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    q = QuantFormat(fmt=args.fmt, bits=args.bits, group_size=args.group_size)
    label = f"{args.fmt}{args.bits} g{args.group_size}"
    print(f"{args.model} batch {args.batch}x{args.seq} on {device}, {args.steps} steps each")
    plain = step_time(base, ids, args.steps, device, args.profile)
    print(f"  plain               {plain * 1e3:8.1f} ms/step")
    variants = ["per-layer"] + (["batched"] if device.type == "cuda" else [])
    for variant in variants:
        quant = copy.deepcopy(base)
        replace_linears(quant, decoder_linear_names(quant),
                        lambda _n, lin: QuantLinear.from_linear(lin, q))
        if variant == "batched":
            from harness.quant.batched import BatchedFakeQuant

            BatchedFakeQuant(quant)
        fq = step_time(quant, ids, args.steps, device, args.profile)
        print(f"  {label} {variant:<10}{fq * 1e3:8.1f} ms/step  ratio {fq / plain:.2f}x")
        del quant


if __name__ == "__main__":
    main()
