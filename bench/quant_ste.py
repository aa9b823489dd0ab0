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
    python bench/quant_ste.py --configs 4096/4,8192/8,16384/8   # CUDA: launch shapes too
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.quant.formats import fake_quantize

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
        from harness.quant.grid import NF3_LEVELS

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


def timed(fn, device, reps: int, rounds: int = 1) -> float:
    """Wall seconds per call: the fastest of ``rounds`` rounds of ``reps`` calls. A lone CUDA
    call takes ~0.2 ms, so one round of 20 is ~4 ms and one stall (a clock change, the
    allocator, the OS) moved it by 0.1-0.3 ms per call (H100, 2026-11-27: the same call read
    0.25 and 0.50 ms in one run); the fastest round is the one no stall hit."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def host_time(fn, device, reps: int, rounds: int = 1) -> float:
    """Seconds the host spends per call: the calls return as soon as their work is queued, so
    timing up to the last return (not the sync) gives the host's share. Equal to the wall time
    when the host, not the GPU, is the bottleneck. Fastest of ``rounds`` rounds."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
        _sync(device)
    return best


def kernel_times(fn, reps: int) -> dict[str, float]:
    """Seconds per call each CUDA kernel runs (profiler; their sum is its "Self CUDA time
    total").

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
    return {e.key: e.self_device_time_total / 1e6 / reps for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and e.self_device_time_total > 0}


def split(times: dict[str, float]) -> str:
    """"fwd/bwd/other" milliseconds: the Triton kernels by name, anything else launched."""
    fwd = sum(t for k, t in times.items() if "_fq_fwd" in k)
    bwd = sum(t for k, t in times.items() if "_fq_bwd" in k)
    other = sum(times.values()) - fwd - bwd
    return f"{fwd * 1e3:.3f}/{bwd * 1e3:.3f}/{other * 1e3:.3f}"


def _power_of_two(text: str) -> bool:
    return text.isdigit() and int(text) > 0 and int(text) & (int(text) - 1) == 0


def parse_configs(text: str) -> list[tuple[int, int]]:
    """"4096/4,16384" -> [(4096, 4), (16384, 0)] (0 warps: the kernel's own choice)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        tile, _, warps = item.partition("/")
        if not _power_of_two(tile) or (warps and not _power_of_two(warps)):
            raise SystemExit(f"error: bad launch shape {item!r}; write TILE or TILE/WARPS "
                             "with powers of two, e.g. 8192/8")
        out.append((int(tile), int(warps or 0)))
    return out


def _default_config() -> str:
    from harness.quant import triton_fq

    return f"{triton_fq.TILE}/{triton_fq.WARPS or 'auto'}"


def sweep(fn, configs: list[tuple[int, int]], floor: float, device, reps: int,
          rounds: int) -> str:
    """Wall and kernel time of ``fn`` at each launch shape, as ratios to the floor. Rows per
    program are uncapped here, so a tile means the same elements for every group size."""
    from harness.quant import triton_fq

    saved = triton_fq.TILE, triton_fq.WARPS, triton_fq.MAX_ROWS
    cells = []
    try:
        for tile, warps in configs:
            triton_fq.TILE, triton_fq.WARPS, triton_fq.MAX_ROWS = tile, warps, 1 << 20
            wall, times = timed(fn, device, reps, rounds), kernel_times(fn, reps)
            # the per-pass split: the backward may prefer another shape than the forward (it
            # reads the forward's per-group stats, so the two need not share one)
            cells.append(f"{tile}/{warps or 'auto'}: {wall / floor:.1f} "
                         f"{sum(times.values()) / floor:.2f} ({split(times)})")
    finally:
        triton_fq.TILE, triton_fq.WARPS, triton_fq.MAX_ROWS = saved
    return "  ".join(cells)


def host_breakdown(w: torch.Tensor, grad: torch.Tensor, fmt: str, bits: int, group: int,
                   reps: int, rounds: int) -> str:
    """CUDA: where a lone fwd+bwd call's host time goes, in microseconds per call (fastest
    round), each part timed on its own:
      fwd/bwd launch: one Triton launch through ``kernel[grid](...)`` (binder, cache key,
        launch), outputs preallocated;
      Function: an autograd Function doing no kernel work (an ``empty_like`` each way), fwd+bwd
        through the engine: what any custom op pays;
      forward: ``fake_quantize`` with the graph recorded, no backward;
      fwd+bwd: the bench's call."""
    from harness.quant import triton_fq as tfq

    dev = w.device
    mode = tfq.MODE_NF3 if fmt == "nf3" else tfq.MODE_ASYM
    cfg = tfq._launch_config(False, group, mode, bits, False)
    n = w.numel() // group
    even = tfq._even(n, cfg)
    grid = (tfq.triton.cdiv(n, cfg["BLOCK_R"]),)
    out, gx = torch.empty_like(w), torch.empty_like(w)
    stats = torch.empty(n, 2, device=dev, dtype=torch.float32)
    wd = w.detach()

    def fwd():
        tfq._fq_fwd[grid](wd, out, stats, n, SAVE=True, EVEN=even, **cfg)

    def bwd():
        tfq._fq_bwd[grid](wd, grad, gx, stats, n, DETACH=False, EVEN=even, **cfg)

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, g):
            return torch.empty_like(g)

    def noop():
        w.grad = None
        Noop.apply(w).backward(grad)

    def forward_only():
        fake_quantize(w, fmt, bits, group)

    def ours():
        w.grad = None
        fake_quantize(w, fmt, bits, group).backward(grad)

    parts = {"fwd launch": fwd, "bwd launch": bwd, "Function": noop, "forward": forward_only,
             "fwd+bwd": ours}
    return ", ".join(f"{name} {host_time(fn, dev, reps, rounds) * 1e6:.0f}"
                     for name, fn in parts.items())


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
    ap.add_argument("--reps", type=int, default=None,
                    help="calls per timed round (default 50 on CUDA, 20 on the CPU)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds, the fastest kept (default 5 on CUDA, 1 on the CPU)")
    ap.add_argument("--no-host-breakdown", action="store_true",
                    help="CUDA: skip the per-case line of host microseconds per part")
    ap.add_argument("--configs", default="", help="CUDA: also time the Triton kernels at these "
                    "launch shapes, comma list of TILE or TILE/WARPS (elements and warps per "
                    "program), e.g. 4096/4,8192/8,16384/8")
    ap.add_argument("--tiles", default="", help="old name of --configs")
    ap.add_argument("--sweep-dtypes", default="bfloat16",
                    help="dtypes --configs sweeps (comma list; each shape compiles anew)")
    args = ap.parse_args()
    configs = parse_configs(args.configs or args.tiles)
    sweep_dtypes = set(args.sweep_dtypes.split(","))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    reps = args.reps or (50 if cuda else 20)
    rounds = args.rounds or (5 if cuda else 1)
    bw = copy_bandwidth(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"weight {args.rows}x{args.cols}, copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'dtype':9s} {'format':10s} {'ref ms':>9s} {'ours ms':>9s} {'floor ms':>9s} "
          f"{'ref/floor':>9s} {'ours/floor':>10s} {'ref/ours':>8s} {'ours/mul':>8s}"
          + (f" {'host ms':>7s} {'ours GPU ms':>11s} {'GPU/floor':>9s}  fwd/bwd/other ms"
             if cuda else ""))
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(args.rows, args.cols, device=device) * 0.02).to(dtype).requires_grad_()
        grad = torch.randn_like(w)
        floor = 4 * w.numel() * w.element_size() / bw

        def mul(w=w, grad=grad):
            w.grad = None
            (w * 1.0).backward(grad)

        t_mul = timed(mul, device, reps, rounds)
        print(f"{str(dtype).removeprefix('torch.')}: w * 1.0, fwd+bwd (one autograd op moving "
              f"the floor's bytes): {t_mul * 1e3:.3f} ms = {t_mul / floor:.1f}x the floor"
              + (f", host {host_time(mul, device, reps, rounds) * 1e3:.3f} ms per call"
                 if cuda else ""), flush=True)
        for fmt, bits, group in CASES:
            def ref(w=w, fmt=fmt, bits=bits, group=group, grad=grad):
                w.grad = None
                reference_fake_quant(w, fmt, bits, group).backward(grad)

            def ours(w=w, fmt=fmt, bits=bits, group=group, grad=grad):
                w.grad = None
                fake_quantize(w, fmt, bits, group).backward(grad)

            t_ref, t_ours = timed(ref, device, reps, rounds), timed(ours, device, reps, rounds)
            name = f"{fmt if fmt == 'nf3' else fmt + str(bits)} g{group}"
            row = (f"{str(dtype).removeprefix('torch.'):9s} {name:10s} {t_ref * 1e3:9.1f} "
                   f"{t_ours * 1e3:9.1f} {floor * 1e3:9.2f} {t_ref / floor:9.1f} "
                   f"{t_ours / floor:10.1f} {t_ref / t_ours:8.2f} {t_ours / t_mul:8.2f}")
            if cuda:
                times = kernel_times(ours, reps)
                k = sum(times.values())
                row += (f" {host_time(ours, device, reps, rounds) * 1e3:7.3f} {k * 1e3:11.3f} "
                        f"{k / floor:9.1f}  {split(times)}")
            print(row, flush=True)
            if cuda and not args.no_host_breakdown:
                print("  host us per call: " + host_breakdown(w, grad, fmt, bits, group, reps,
                                                                rounds), flush=True)
            if configs and cuda and str(dtype).removeprefix("torch.") in sweep_dtypes:
                # printed as it goes: a bench cut off by a timeout keeps what it measured
                print(f"  launch shapes (tile/warps: wall/floor GPU/floor (fwd/bwd/other ms); default "
                      f"{_default_config()}): " + sweep(ours, configs, floor, device, reps, rounds),
                      flush=True)


if __name__ == "__main__":
    main()
