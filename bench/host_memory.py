"""What ``harness.host_memory.keep_freed_memory`` buys on the CPU: a fake-quantized training step
(NF3 g64, cross-entropy, AdamW) and a perplexity forward of one 2048-token window, in a process
with glibc's default allocator against one that keeps its freed memory.

    python bench/host_memory.py                      # SmolLM2, 4x256 (the quick profile's step)
    python bench/host_memory.py --shape-only --steps 2

The allocator setting cannot be undone inside a process, so each variant runs in a child
process; the children alternate (default, kept, default, kept ...) and the fastest round of
each counts. The losses of both must be equal: the setting moves memory, not arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_step import bench_model, step_bench_args  # noqa: E402


def child(args) -> dict:
    from harness.host_memory import keep_freed_memory
    from harness.quant import QuantFormat, QuantLinear, decoder_linear_names, replace_linears

    kept = keep_freed_memory() if args.child == "kept" else False
    device = torch.device("cpu")
    model = bench_model(args, device)
    q = QuantFormat(fmt="nf3", bits=3, group_size=64)
    replace_linears(model, decoder_linear_names(model),
                    lambda _n, lin: QuantLinear.from_linear(lin, q))
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    window = torch.randint(0, model.config.vocab_size, (1, 2048))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    losses, times = [], []
    for _ in range(args.steps + 1):  # the first step warms up and is not timed
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        model(input_ids=window)
        t = time.perf_counter()
        nll = float(model(input_ids=window, labels=window).loss)
        eval_s = time.perf_counter() - t
    return {"kept": kept, "step_s": min(times[1:]), "eval_tok_s": 2048 / eval_s,
            "losses": losses, "nll": nll}


def run_child(variant: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, *argv], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = step_bench_args()
    ap.set_defaults(batch=4, seq=256, steps=3, device="cpu")
    ap.add_argument("--child", choices=["default", "kept"], help=argparse_hide())
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:]]
    print(f"{args.model if not args.shape_only else 'smollm2-135m-shaped'} nf3 g64, "
          f"{args.batch}x{args.seq}, {args.steps} timed steps per round, {args.rounds} rounds")
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in ("default", "kept"):
            r = run_child(variant, argv)
            if variant == "kept" and not r["kept"]:
                sys.exit("keep_freed_memory() did not take here (not glibc?): nothing to compare")
            print(f"  {variant:<8} step {r['step_s']:6.2f} s   eval {r['eval_tok_s']:6.0f} tok/s")
            if variant not in best or r["step_s"] < best[variant]["step_s"]:
                best[variant] = r
    d, k = best["default"], best["kept"]
    same = d["losses"] == k["losses"] and d["nll"] == k["nll"]
    print(f"  step time kept / default: {k['step_s'] / d['step_s']:.2f}x; "
          f"eval tokens/s kept / default: {k['eval_tok_s'] / d['eval_tok_s']:.2f}x; "
          f"losses and NLL identical: {same}")


def argparse_hide() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
