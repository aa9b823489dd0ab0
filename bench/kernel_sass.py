"""Static instruction counts of the Triton fake-quant kernels, compiled for a GPU without one.

    python bench/kernel_sass.py                  # sm_90 (H100/H200), the quant_ste formats
    python bench/kernel_sass.py --arch 80 --tile 16384

The kernels are straight-line code (no loops), so the SASS instruction count of one program
times its warps, divided by the elements it handles, is the warp-instructions each element
costs. It is a proxy, not a timing: it shows where instructions go (IEEE divisions, shuffles
for reductions, shared-memory barriers) on a machine with no GPU; bench/quant_ste.py measures
on one. Needs Triton (its bundled ptxas and nvdisasm); nothing runs on a device.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

FORMATS = [("int2 g64", "int", 2, 64), ("int2 g128", "int", 2, 128),
           ("int3 g128", "int", 3, 128), ("nf3 g128", "nf3", 3, 128)]
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


_REGS = re.compile(r"REG:(\d+) .*LOCAL:(\d+)")
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32  # sm_80 / sm_90


def resident_warps(regs: int, warps: int) -> int:
    """Warps an SM holds at once, as registers allow (allocated per warp in units of 256)."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(MAX_BLOCKS_PER_SM, REGISTERS_PER_SM // (per_warp * warps))
    return min(MAX_WARPS_PER_SM // warps, blocks) * warps


def sass_ops(kernel, signature: dict, constexprs: dict, num_warps: int, arch: int,
             fusion: bool = False):
    """(instruction counts by opcode, registers per thread, local-memory bytes = spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Pointers and sizes get the 16-divisibility hint a real launch would specialize on;
    # without it Triton cannot vectorize loads and the counts would be meaningless.
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())
             if t != "constexpr"}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": fusion})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "nvdisasm")
    cuobjdump = os.path.join(os.path.dirname(nvdisasm), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, local = map(int, _REGS.search(usage).groups())
    ops = collections.Counter(m.group(1) for m in map(_INSTR.search, text.splitlines())
                              if m and m.group(1) != "NOP")
    return ops, regs, local


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100)")
    ap.add_argument("--tile", type=int, default=None, help="elements per program")
    ap.add_argument("--warps", type=int, default=None, help="warps per program")
    args = ap.parse_args()
    from harness.quant import triton_fq as tfq

    if args.tile:
        tfq.TILE, tfq.MAX_ROWS = args.tile, 1 << 20  # as bench/quant_ste.py --configs
    if args.warps:
        tfq.WARPS = args.warps
    print(f"sm_{args.arch}, tile {tfq.TILE}, warps {tfq.WARPS or 'auto'}: warp-instructions per "
          "element (static SASS); registers per thread, spilled bytes, warps an SM holds and the "
          "bytes they load at once (all of a program's loads are issued before its reductions)")
    print("| dtype | format | pass | instructions | per element | MUFU | div calls | SHFL | BAR "
          "| regs | spill B | warps/SM | KB loaded/SM |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tname in ("bf16", "fp32"):
        for label, fmt, bits, group in FORMATS:
            mode = tfq.MODE_NF3 if fmt == "nf3" else tfq.MODE_ASYM
            cfg = dict(tfq._launch_config(False, group, mode, bits, True))
            warps = cfg.pop("num_warps")
            cfg.pop("enable_fp_fusion")
            elems = cfg["BLOCK_G"] * cfg["BLOCK_R"]
            passes = {
                "fwd": (tfq._fq_fwd, {"x_ptr": f"*{tname}", "out_ptr": f"*{tname}",
                                      "stats_ptr": "*fp32", "n_groups": "i32"},
                        {**cfg, "SAVE": True, "EVEN": True}),
                "bwd": (tfq._fq_bwd, {"x_ptr": f"*{tname}", "g_ptr": f"*{tname}",
                                      "gx_ptr": f"*{tname}", "stats_ptr": "*fp32",
                                      "n_groups": "i32"}, {**cfg, "DETACH": False, "EVEN": True}),
            }
            passes["fwd, many"] = (tfq._fq_fwd_many, {"table_ptr": "*i64", "map_ptr": "*i32",
                                                      "x_proto": f"*{tname}",
                                                      "out_proto": f"*{tname}"},
                                   {**cfg, "SAVE": True, "EVEN": True})
            passes["bwd, many"] = (tfq._fq_bwd_many, {"table_ptr": "*i64", "map_ptr": "*i32",
                                                      "x_proto": f"*{tname}",
                                                      "g_proto": f"*{tname}"},
                                   {**cfg, "DETACH": False, "EVEN": True})
            size = 2 if tname == "bf16" else 4
            for name, (kernel, sig, consts) in passes.items():
                sig = {**sig, **{k: "constexpr" for k in consts}}
                ops, regs, local = sass_ops(kernel, sig, consts, warps, args.arch)
                n = sum(ops.values())
                held = resident_warps(regs, warps)
                loads = 2 if name.startswith("bwd") else 1  # x (and the incoming gradient)
                kb = held / warps * elems * size * loads / 1024
                print(f"| {tname} | {label} | {name} | {n} | {n * warps / elems:.2f} | "
                      f"{ops['MUFU']} | {ops['CALL']} | {ops['SHFL']} | {ops['BAR']} | "
                      f"{regs} | {local} | {held} | {kb:.0f} |")


if __name__ == "__main__":
    main()
