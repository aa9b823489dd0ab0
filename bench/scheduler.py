"""Scheduler overhead: N small runs (RTN w2 on tiny-llama, tiny eval) inline vs through Ray.

Prints Ray's fixed cost (start + shutdown of a local instance, paid once per ``harness run``),
its overhead per run (one run through Ray minus the same run inline: a fresh worker process,
its imports, shipping results back) and the scaling of N runs in flight at once with fractional
CPUs (N x the one-run time / the N-run time; CPU-bound runs cannot beat the core count). Each
measurement writes a fresh SQLite database; nothing is reused between them.

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
    from harness.orchestration.plan import build_spec

    dims = decoder_in_features("tiny-llama")
    ev = {"max_tokens": 64, "seq_len": 32, "tasks": ()}
    return [build_spec("tiny-llama", "rtn", {"bits": 2}, "quick", seed, ev, dims)
            for seed in range(n)]


def timed(scheduler: str, n: int, root: Path, tag: str, cpus_per_run: float = 1.0) -> float:
    from harness.orchestration.scheduler import execute
    from harness.store import Store

    store = Store(f"sqlite:///{root / (tag + '.db')}")
    start = time.perf_counter()
    outcomes = execute(specs(n), store, root / tag, scheduler=scheduler, progress=False,
                       cpus_per_run=cpus_per_run)
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
    cpus = os.cpu_count() or 1
    frac = min(1.0, cpus / n)  # fractional CPUs: all n runs are in flight at once
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        specs(1)  # warm caches (tokenizer, corpus) so neither path pays them first
        inline1 = timed("inline", 1, root, "inline1")
        inline = timed("inline", n, root, "inline")
        fixed = ray_fixed_cost()
        ray1 = timed("ray", 1, root, "ray1")
        ray_n = timed("ray", n, root, "ray", cpus_per_run=frac)
    overhead = ray1 - fixed - inline1
    busy1, busy_n = ray1 - fixed, ray_n - fixed
    scaling = n * busy1 / busy_n
    print(f"runs: rtn w2 on tiny-llama (eval 64 tokens), {cpus} CPU(s); Ray start/stop "
          f"{fixed:.1f} s (once per `harness run`, excluded below)")
    print(f"inline : 1 run {inline1:6.2f} s, {n} runs {inline:6.2f} s ({inline / n:.2f} s/run)")
    print(f"ray    : 1 run {busy1:6.2f} s, {n} concurrent runs ({frac:g} CPU each) "
          f"{busy_n:6.2f} s ({busy_n / n:.2f} s/run)")
    print(f"Ray overhead per run (1 run, Ray vs inline): {overhead:.2f} s  [target <= 5 s]")
    print(f"scaling of {n} concurrent runs vs 1 through Ray: {scaling:.2f}x "
          f"(ideal for CPU-bound runs on {cpus} CPU(s): {min(n, cpus)}x)")
    print(f"{n} runs through Ray vs inline, Ray start included: {inline / ray_n:.2f}x")


if __name__ == "__main__":
    main()
