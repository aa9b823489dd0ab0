"""The Ray scheduler through the real CLI: a grid runs concurrently, every metric lands, a rerun
skips finished runs, and a run whose worker is killed fails cleanly and resumes on rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness.cli"]


def harness(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*HARNESS, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def test_teacher_key_matches_training_blocks():
    from harness.experiments import load_experiment
    from harness.ray_scheduler import teacher_key

    specs = {s.method: s for s in load_experiment(ROOT / "experiments/smollm2-default.yaml").specs}
    assert teacher_key(specs["bitdistiller"]) == ("smollm2-135m", "smollm2-135m", 64, 256, 0.7)
    assert teacher_key(specs["onebit"]) == teacher_key(specs["bitdistiller"])
    rtn = load_experiment(ROOT / "experiments/smoke.yaml").specs[0]
    assert teacher_key(rtn) is None


def test_smoke_experiment_through_ray_then_rerun_skips(tmp_path):
    from harness.store import Store

    db = f"sqlite:///{tmp_path / 'x.db'}"
    res = harness("run", "experiments/smoke.yaml", "--db", db, "--output-dir", tmp_path / "runs")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ray: 4 run(s)" in res.stderr and "[4/4]" in res.stderr
    store = Store(db, readonly=True)
    runs = store.runs()
    assert sorted(r.method for r in runs) == ["clip", "fp", "qat", "rtn"]
    for r in runs:  # four runs executed concurrently, every one's metrics written by the driver
        assert r.status == "finished" and r.experiment_id is not None and r.wall_s > 0
        metrics = store.metric_dict(r.id)
        assert {"ppl", "size_mb", "peak_rss_mb", "time_eval_s"} <= set(metrics)
        assert r.device == "cpu"
    qat = next(r for r in runs if r.method == "qat")
    assert [s.step for s in store.train_steps(qat.id)] == [1, 2, 3, 4]
    assert "packed" in store.artifacts(qat.id)

    again = harness("run", "experiments/smoke.yaml", "--db", db, "--output-dir",
                    tmp_path / "runs")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 run(s) already finished were reused" in again.stdout
    assert "ray:" not in again.stderr  # nothing pending: Ray is not even started
    assert all(r.attempts == 1 for r in Store(db, readonly=True).runs())


KILL = """
name: kill-test
model: tiny-llama
profile: quick
eval: {max_tokens: 128, seq_len: 64, tasks: []}
methods:
  qat:
    calib_samples: 1
    calib_seq_len: 32
    clip: false
    data: corpus       # teacher data is bitdistiller's alone here: generated once, shared
    train: {steps: 30, batch_size: 1, seq_len: 32, checkpoint_every: 3}
  bitdistiller:
    calib_samples: 1
    calib_seq_len: 32
    clip: false
    train: {steps: 2, batch_size: 1, seq_len: 32, teacher_samples: 4, teacher_new_tokens: 16}
grid:
  bits: [2]
"""


def _worker_pid(name: str, timeout: float = 240) -> int:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::") and name in cmd:
                return p.info["pid"]
        time.sleep(0.1)
    raise AssertionError(f"no Ray worker process named {name}")


def test_killed_worker_fails_cleanly_and_rerun_resumes(tmp_path):
    from harness.experiments import load_experiment
    from harness.ray_scheduler import WORKER_DIED
    from harness.store import Store

    exp_file = tmp_path / "kill.yaml"
    exp_file.write_text(KILL)
    qat = next(s for s in load_experiment(exp_file).specs if s.method == "qat")
    db = f"sqlite:///{tmp_path / 'x.db'}"
    out = tmp_path / "runs"
    args = ["run", exp_file, "--no-fp", "--db", db, "--output-dir", out]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([*HARNESS, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = _worker_pid(f"qat-{qat.run_key}")
        ckpt = out / qat.run_key / "checkpoint"
        deadline = time.time() + 400  # generous: a loaded 2-core machine is slow, not broken
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt.exists(), "training never checkpointed"
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert WORKER_DIED in stderr
    assert stderr.count("ray: teacher data for tiny-llama") == 1  # generated once, shared
    store = Store(db, readonly=True)
    runs = {(r.method, r.spec["config"].get("loss")): r for r in store.runs()}
    dead = runs[("qat", "ce")]
    assert dead.status == "failed" and dead.error == WORKER_DIED
    kept = [s.step for s in store.train_steps(dead.id)]
    assert kept and kept == list(range(1, len(kept) + 1))  # recovered from the worker's spool
    assert runs[("bitdistiller", "cakld")].status == "finished"  # the others carried on

    res = harness(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 run(s) already finished were reused" in res.stdout
    store = Store(db, readonly=True)
    run = store.get_run(dead.id)
    assert run.status == "finished" and run.attempts == 2 and run.error is None
    metrics = store.metric_dict(run.id)
    assert metrics["resumed_from_step"] >= 3 and "ppl" in metrics
    steps = [s.step for s in store.train_steps(run.id)]
    assert steps == list(range(1, 31))  # nothing lost, nothing duplicated
    names = [m.name for m in store.metrics(run.id)]
    assert len(names) == len(set(names))


def test_sigterm_to_the_driver_marks_runs_in_flight_failed_and_exits_143(tmp_path):
    """ray.init replaces the driver's SIGTERM handler with sys.exit; ours is put back."""
    from harness.store import Store

    exp_file = tmp_path / "sig.yaml"
    exp_file.write_text(KILL.replace("steps: 30,", "steps: 3000,"))
    db = f"sqlite:///{tmp_path / 'x.db'}"
    out = tmp_path / "runs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([*HARNESS, "run", str(exp_file), "--no-fp", "--db", db,
                             "--output-dir", str(out)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 400
        while not list(out.glob("*/checkpoint")) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "error: interrupted by SIGTERM; rerun the same command to resume" in stderr
    runs = {r.method: r for r in Store(db, readonly=True).runs()}
    assert runs["qat"].status == "failed" and "interrupted by SIGTERM" in runs["qat"].error
