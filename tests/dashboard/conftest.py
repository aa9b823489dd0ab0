"""Small results databases shaped like real runs.

``fake_db``: fp, rtn, clip, qat, bitdistiller, onebit finished (metrics, task accuracy, train
steps, layer stats), one failed and one running; stored without intervals, as runs were before
the harness recorded them. ``noise_db``: runs with 95% PPL intervals and accuracy standard
errors, one of them (qat) in three seeds, one older run (rtn) without any interval."""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timedelta

import pytest

from harness.store import Run, Store

MODEL = "tiny-llama"
LAYERS = ("layers.0", "layers.1")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _add_run(store: Store, method: str, bits: int | None, status: str = "finished",
             error: str | None = None, fmt: str | None = "int", group: int | None = 128,
             minutes: int = 0, seed: int = 0) -> int:
    spec = {"schema": 1, "method": method, "model": MODEL, "fmt": fmt, "bits": bits,
            "group_size": group, "profile": "quick", "seed": seed, "config": {"steps": 20}}
    h = hashlib.sha256(repr(spec).encode()).hexdigest()
    start = datetime(2026, 1, 1, 12, 0) + timedelta(minutes=minutes)
    with store.session() as s, s.begin():
        run = Run(run_key=h[:12], spec_hash=h, method=method, model=MODEL, fmt=fmt, bits=bits,
                  group_size=group, profile="quick", seed=seed, spec=spec, status=status,
                  error=error, started_at=start,
                  finished_at=None if status == "running" else start + timedelta(seconds=42),
                  wall_s=None if status == "running" else 42.0, host="test", device="cpu",
                  versions={"torch": "2.x"}, attempts=1)
        s.add(run)
        s.flush()
        return run.id


def _metrics(store: Store, run_id: int, ppl: float, size_mb: float, bpw: float,
             tasks: dict[str, float] | None = None) -> None:
    store.add_metric(run_id, "ppl", ppl, extra={"dataset": "shakespeare-heldout", "seq_len": 256})
    store.add_metric(run_id, "size_mb", size_mb)
    store.add_metric(run_id, "bits_per_weight", bpw)
    store.add_metric(run_id, "compression_vs_fp16", 16 / bpw)
    store.add_metric(run_id, "peak_rss_mb", 900.0)
    for stage, sec in (("load", 1.5), ("prepare", 3.0), ("eval", 4.0)):
        store.add_metric(run_id, f"time_{stage}_s", sec)
    if tasks:
        for task, acc in tasks.items():
            store.add_metric(run_id, "acc", acc, task=task)
            store.add_metric(run_id, "acc_norm", acc + 0.02, task=task)
        store.add_metric(run_id, "acc_avg", sum(tasks.values()) / len(tasks))  # of acc, as stored


def _steps(store: Store, run_id: int, n: int = 20, start_loss: float = 6.0) -> None:
    for step in range(1, n + 1):
        store.add_train_step(run_id, step, start_loss * math.exp(-step / 8) + 1.0,
                             1e-4 * min(1.0, step / 5), 1500.0 + 10 * step)


def _clip_stats(store: Store, run_id: int) -> None:
    for li, layer in enumerate(LAYERS):
        for mi, module in enumerate(MODULES):
            before = 1e-3 * (1 + li) * (1 + mi)
            store.add_layer_stat(run_id, layer, module, "rtn_output_mse", before)
            store.add_layer_stat(run_id, layer, module, "clip_output_mse", before * 0.6)


def build_db(url: str) -> dict[str, int]:
    """Writes the fake runs; returns ``{name: run id}``."""
    store = Store(url)
    ids = {}
    ids["fp"] = _add_run(store, "fp", None, fmt=None, group=None)
    _metrics(store, ids["fp"], 20.0, 270.0, 16.0, {"arc_easy": 0.60, "piqa": 0.65})
    ids["rtn"] = _add_run(store, "rtn", 2, minutes=1)
    _metrics(store, ids["rtn"], 4500.0, 60.0, 2.25, {"arc_easy": 0.26, "piqa": 0.52})
    ids["clip"] = _add_run(store, "clip", 2, minutes=2)
    _metrics(store, ids["clip"], 900.0, 60.0, 2.25)  # no tasks: columns stay NaN
    _clip_stats(store, ids["clip"])
    ids["qat"] = _add_run(store, "qat", 3, minutes=3)
    _metrics(store, ids["qat"], 31.0, 80.0, 3.25, {"arc_easy": 0.50, "piqa": 0.61})
    _clip_stats(store, ids["qat"])
    _steps(store, ids["qat"])
    ids["bitdistiller"] = _add_run(store, "bitdistiller", 2, minutes=4)
    _metrics(store, ids["bitdistiller"], 45.0, 60.0, 2.25, {"arc_easy": 0.45, "piqa": 0.58})
    _clip_stats(store, ids["bitdistiller"])
    _steps(store, ids["bitdistiller"], start_loss=9.0)
    ids["onebit"] = _add_run(store, "onebit", 1, fmt="binary", group=None, minutes=5)
    _metrics(store, ids["onebit"], 210.0, 40.0, 1.02)
    for layer in LAYERS:
        for module in MODULES:
            store.add_layer_stat(ids["onebit"], layer, module, "svid_error", 0.8)
            store.add_layer_stat(ids["onebit"], layer, module, "svd_rank1_error", 0.7)
    _steps(store, ids["onebit"], n=10)
    ids["failed"] = _add_run(store, "bitdistiller", 3, status="failed", minutes=6,
                             error="TrainingDiverged: loss became nan at step 7; lower --set lr")
    ids["running"] = _add_run(store, "clip", 3, status="running", minutes=7)
    store.add_metric(ids["running"], "time_load_s", 1.0)
    store.engine.dispose()
    return ids


# PPL 95% intervals (asymmetric, as a bootstrap of exp(mean NLL) is) and accuracy stderr.
NOISE_PPL = {"fp": (20.0, 19.6, 20.5), "qat0": (31.0, 30.3, 31.9), "qat1": (31.6, 30.9, 32.5),
             "qat2": (30.7, 30.0, 31.6), "bitdistiller": (31.9, 31.2, 32.9),
             "clip": (36.0, 35.2, 36.9)}
NOISE_ACC = {"fp": (0.60, 0.65), "qat0": (0.50, 0.61), "qat1": (0.52, 0.60),
             "qat2": (0.49, 0.63), "bitdistiller": (0.45, 0.58)}
NOISE_SE = 0.02  # every task's stderr; acc_avg's is sqrt(2 * 0.02^2) / 2


def _with_noise(store: Store, run_id: int, name: str, size_mb: float, bpw: float) -> None:
    ppl, low, high = NOISE_PPL[name]
    tasks = dict(zip(("arc_easy", "piqa"), NOISE_ACC[name], strict=True)) \
        if name in NOISE_ACC else None
    _metrics(store, run_id, ppl, size_mb, bpw, tasks)
    store.add_metric(run_id, "ppl_ci95_low", low)
    store.add_metric(run_id, "ppl_ci95_high", high)
    if tasks:
        for task in tasks:
            store.add_metric(run_id, "acc_stderr", NOISE_SE, task=task)
        store.add_metric(run_id, "acc_avg_stderr", math.sqrt(2 * NOISE_SE ** 2) / 2)


def build_noise_db(url: str) -> dict[str, int]:
    """fp, rtn (no intervals), qat in seeds 0-2, bitdistiller and clip; ``{name: run id}``.

    With the seed group's interval (mean 31.1, whiskers: the members' mean half-widths 0.7
    below and 0.9 above, wider than the std 0.46), bitdistiller [31.2, 32.9] is within noise
    of qat and clip [35.2, 36.9] is not; rtn has no interval and ranks strictly, last."""
    store = Store(url)
    ids = {"fp": _add_run(store, "fp", None, fmt=None, group=None)}
    _with_noise(store, ids["fp"], "fp", 270.0, 16.0)
    store.add_metric(ids["fp"], "ppl_wikitext2", 25.0)
    store.add_metric(ids["fp"], "ppl_wikitext2_ci95_low", 24.0)
    store.add_metric(ids["fp"], "ppl_wikitext2_ci95_high", 26.1)
    ids["rtn"] = _add_run(store, "rtn", 2, minutes=1)
    _metrics(store, ids["rtn"], 4500.0, 60.0, 2.25, {"arc_easy": 0.26, "piqa": 0.52})
    for seed in range(3):
        ids[f"qat{seed}"] = _add_run(store, "qat", 3, minutes=2 + seed, seed=seed)
        _with_noise(store, ids[f"qat{seed}"], f"qat{seed}", 80.0, 3.25)
    ids["bitdistiller"] = _add_run(store, "bitdistiller", 3, minutes=5)
    _with_noise(store, ids["bitdistiller"], "bitdistiller", 80.0, 3.25)
    ids["clip"] = _add_run(store, "clip", 3, minutes=6)
    _with_noise(store, ids["clip"], "clip", 80.0, 3.25)
    store.engine.dispose()
    return ids


@pytest.fixture(scope="session")
def noise_db(tmp_path_factory) -> tuple[str, dict[str, int]]:
    """(URL, ids) of the database with intervals and a seed group; opened read-only."""
    url = f"sqlite:///{tmp_path_factory.mktemp('noise') / 'runs.db'}"
    return url, build_noise_db(url)


@pytest.fixture(scope="session")
def fake_db(tmp_path_factory) -> tuple[str, dict[str, int]]:
    """(URL, ids) of the shared fake database; tests open it read-only."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'runs.db'}"
    return url, build_db(url)


@pytest.fixture
def ro_store(fake_db) -> Store:
    return Store(fake_db[0], readonly=True)


@pytest.fixture
def empty_db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(url).engine.dispose()
    return url
