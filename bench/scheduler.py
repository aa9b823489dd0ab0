"""Scheduler overhead: N small runs (RTN w2 on tiny-llama, tiny eval) inline vs through Ray.

Prints the wall time of each path, the time per run, Ray's fixed cost (start + shutdown of a
local instance) and the speed-up of running the N runs concurrently. Each path writes a fresh
SQLite database; nothing is reused between them.

    python bench/scheduler.py [--runs 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def specs(n: int):
    from harness.models import decoder_in_features
    from harness.plan import build_spec

    dims = decoder_in_features("tiny-llama")
    ev = {"max_tokens": 64, "seq_len": 32, "tasks": ()}
    return [build_spec("tiny-llama", "rtn", {"bits": 2}, "quick", seed, ev, dims)
            for seed in range(n)]


def timed(scheduler: str, n: int, root: Path) -> float:
    from harness.scheduler import execute
    from harness.store import Store

    store = Store(f"sqlite:///{root / (scheduler + '.db')}")
    start = time.perf_counter()
    outcomes = execute(specs(n), store, root / scheduler, scheduler=scheduler, progress=False)
    took = time.perf_counter() - start
    bad = [o for o in outcomes if o.status != "finished"]
    if bad:
        sys.exit(f"{scheduler}: {len(bad)} run(s) failed: {bad[0].error}")
    return took


def ray_fixed_cost() -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.shutdown()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    n = args.runs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        specs(1)  # warm caches (tokenizer, corpus) so neither path pays them first
        inline = timed("inline", n, root)
        ray_total = timed("ray", n, root)
        fixed = ray_fixed_cost()
    cpus = os.cpu_count() or 1
    print(f"{n} runs of rtn w2 on tiny-llama (eval 64 tokens), {cpus} CPU(s)")
    print(f"inline : {inline:7.1f} s total, {inline / n:6.2f} s per run")
    print(f"ray    : {ray_total:7.1f} s total, {ray_total / n:6.2f} s per run "
          f"(incl. Ray start/stop ~{fixed:.1f} s)")
    conc = min(n, cpus)
    ideal = inline / conc
    print(f"speed-up of {n} concurrent runs: {inline / ray_total:.2f}x "
          f"(ideal with {conc} workers: {conc}x = {ideal:.1f} s)")
    print(f"Ray overhead per run: {(ray_total - fixed - ideal) * conc / n:.2f} s "
          f"(worker start, imports, model load in each worker; fixed cost excluded)")


if __name__ == "__main__":
    main()
