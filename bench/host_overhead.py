"""Host-side cost of fake quantization per training step, kernels stubbed out (runs on a CPU).

    python bench/host_overhead.py            # SmolLM2-135M's 210 decoder linears

On a GPU the fake-quant kernels take ~1-2 ms per SmolLM2 step, but each layer also costs the
host an autograd node, allocations and our Python, once in the forward and once in the
backward. This measures that part alone: the Triton launches are replaced by no-ops, the
weights are CPU tensors of SmolLM2's shapes, and one forward + backward through every layer is
timed per layer (``TritonFakeQuant``, what ``QuantLinear`` uses) and batched
(``TritonFakeQuantMany``, what ``harness.quant.batched`` uses). Triton's own launcher cost
(tens of microseconds per launch, not measurable without a GPU) comes on top, 420 launches per
step per layer against 2 batched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def decoder_linear_shapes() -> list[tuple[int, int]]:
    """[out, in] of every decoder linear of SmolLM2-135M: q k v o gate up down per block."""
    from train_step import smollm2_config

    c = smollm2_config()
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    block = [(h, h), (kv, h), (kv, h), (h, h), (c.intermediate_size, h),
             (c.intermediate_size, h), (h, c.intermediate_size)]
    return block * c.num_hidden_layers


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from harness.quant import triton_fq as tfq

    for name in ("_fq_fwd", "_fq_bwd", "_fq_fwd_many", "_fq_bwd_many"):
        setattr(tfq, name, _NoLaunch())
    ws = [torch.zeros(s).requires_grad_() for s in decoder_linear_shapes()]
    qargs = ("int", 2, 64, False, False, torch.float16)

    def per_layer():
        outs = [tfq.fake_quantize_triton(w, *qargs, out_dtype=torch.bfloat16) for w in ws]
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    def batched():
        outs = tfq.fake_quantize_many(ws, *qargs, out_dtype=torch.bfloat16)
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    print(f"{len(ws)} layers of SmolLM2's shapes, int2 g64, kernels stubbed, "
          f"median of {args.reps} fwd+bwd")
    for label, fn in (("per-layer", per_layer), ("batched", batched)):
        fn()
        times = []
        for _ in range(args.reps):
            for w in ws:
                w.grad = None
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"  {label:<10} {med * 1e3:7.2f} ms per step  ({med / len(ws) * 1e6:6.1f} us per layer)")


if __name__ == "__main__":
    main()
