"""Fake-quantization + STE speed vs the papers' naive code and the memory floor.

For a weight (default 11008x4096, a LLaMA-7B MLP matrix), times forward+backward of:
  - ref:  the formulas of METHODS.md written naively, as the reference repositories do
          (flattened groups, torch.round-based STE through separate ops, fp32 upcast);
  - ours: harness.quant.fake_quantize (the path QuantLinear trains with);
and the memory floor: bytes a fused kernel must move (read w, write w_q, read grad, write
grad_w) divided by the device copy bandwidth measured in the same run. Prints ratios; on CUDA
also the time ours keeps the GPU busy (kernel time from the profiler), since a lone call's
wall time can be bound by the host's launches instead.
Each repetition starts with ``w.grad = None``, as a training step after
``zero_grad(set_to_none=True)``: otherwise autograd adds every new gradient into the old one,
three more passes over the weight that neither the floor nor a training step has (runs before
2026-11-26 afternoon timed them for ref and ours alike).

    python bench/quant_ste.py                      # CUDA if available, else CPU
    python bench/quant_ste.py --rows 2048 --cols 1024 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.quant.primitives import fake_quantize

CASES = [("int", 2, 64), ("int", 2, 128), ("int", 3, 128), ("nf3", 3, 128)]


def reference_fake_quant(w: torch.Tensor, fmt: str, bits: int, group: int) -> torch.Tensor:
    """Naive reference (BitDistiller-style pseudo_quantize_tensor with an STE wrapper)."""
    shape = w.shape
    x = w.float().reshape(-1, group)
    if fmt == "int":
        mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
        qmax = 2**bits - 1
        scale = (mx - mn).clamp(min=1e-5) / qmax
        zero = (-torch.round(mn / scale)).clamp(0, qmax)
        q = (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale
    else:
        from harness.quant.primitives import NF3_LEVELS

        levels = torch.tensor(NF3_LEVELS, device=x.device)
        mx = x.amax(1, keepdim=True)
        mn = x.amin(1, keepdim=True).abs()
        normed = torch.where(x >= 0, x / mx, x / mn)
        idx = (normed.unsqueeze(-1) - levels).abs().argmin(-1)
        q = levels[idx]
        q = torch.where(x >= 0, q * mx, q * mn)
    q = x + (q - x).detach()
    return q.reshape(shape).to(w.dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def kernel_time(fn, reps: int) -> float:
    """Seconds per call that CUDA kernels run (profiler, summed as its "Self CUDA time total").

    A single fwd+bwd call's wall time also holds the host's work (autograd, launches): when
    that is longer than the kernels, the GPU idles between calls and the wall time no longer
    says how close the kernels are to the memory floor; this does.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return total_us / 1e6 / reps


def copy_bandwidth(device, nbytes: int = 1 << 28) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, 10)
    return 2 * nbytes / t  # read + write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiles", default="", help="CUDA: also time the Triton kernel at these "
                    "elements-per-program values (comma list), bf16 only")
    args = ap.parse_args()
    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"weight {args.rows}x{args.cols}, copy bandwidth {bw / 1e9:.1f} GB/s")
    cuda = device.type == "cuda"
    print(f"{'dtype':9s} {'format':10s} {'ref ms':>9s} {'ours ms':>9s} {'floor ms':>9s} "
          f"{'ref/floor':>9s} {'ours/floor':>10s} {'ref/ours':>8s}"
          + (f" {'ours GPU ms':>11s} {'GPU/floor':>9s}" if cuda else ""))
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(args.rows, args.cols, device=device) * 0.02).to(dtype).requires_grad_()
        grad = torch.randn_like(w)
        floor = 4 * w.numel() * w.element_size() / bw
        for fmt, bits, group in CASES:
            def ref(w=w, fmt=fmt, bits=bits, group=group, grad=grad):
                w.grad = None
                reference_fake_quant(w, fmt, bits, group).backward(grad)

            def ours(w=w, fmt=fmt, bits=bits, group=group, grad=grad):
                w.grad = None
                fake_quantize(w, fmt, bits, group).backward(grad)

            t_ref, t_ours = timed(ref, device, args.reps), timed(ours, device, args.reps)
            name = f"{fmt if fmt == 'nf3' else fmt + str(bits)} g{group}"
            if args.tiles and device.type == "cuda" and dtype == torch.bfloat16:
                from harness.quant import triton_fq

                default, sweep = triton_fq.TILE, []
                for tile in map(int, args.tiles.split(",")):
                    triton_fq.TILE = tile
                    sweep.append(f"{tile}:{timed(ours, device, args.reps) / floor:.1f}")
                triton_fq.TILE = default
                print(f"  tile sweep {name} (elements per program: ours/floor) {' '.join(sweep)}")
            row = (f"{str(dtype).removeprefix('torch.'):9s} {name:10s} {t_ref * 1e3:9.1f} "
                   f"{t_ours * 1e3:9.1f} {floor * 1e3:9.2f} {t_ref / floor:9.1f} "
                   f"{t_ours / floor:10.1f} {t_ref / t_ours:8.2f}")
            if cuda:
                k = kernel_time(ours, args.reps)
                row += f" {k * 1e3:11.3f} {k / floor:9.1f}"
            print(row)


if __name__ == "__main__":
    main()
