"""Training-step cost of fake quantization: plain step vs every decoder linear quantized.

    python bench/train_step.py                                   # SmolLM2, 8x1024 (GPU sizes)
    python bench/train_step.py --batch 2 --seq 256 --steps 3     # CPU-sized
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import nullcontext

import torch

from harness.models import load_model
from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears


def step_time(model, ids, steps: int, device) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    times = []
    for _ in range(steps + 1):  # first step warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / steps


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
    args = ap.parse_args()
    device = torch.device(args.device)
    base, _ = load_model(args.model, device=device)
    base.train()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    plain = step_time(base, ids, args.steps, device)
    quant = copy.deepcopy(base)
    q = QuantFormat(fmt=args.fmt, bits=args.bits, group_size=args.group_size)
    replace_linears(quant, decoder_linear_names(quant), lambda _n, lin: QuantLinear.from_linear(lin, q))
    fq = step_time(quant, ids, args.steps, device)
    print(f"{args.model} batch {args.batch}x{args.seq} on {device}: plain {plain * 1e3:.0f} ms/step, "
          f"fake-quant {args.fmt}{args.bits} g{args.group_size} {fq * 1e3:.0f} ms/step, "
          f"ratio {fq / plain:.2f}x")


if __name__ == "__main__":
    main()
