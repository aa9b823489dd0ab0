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

from tests.helpers.net import RAY_TOKEN_ENV

ROOT = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness.cli"]


# the `ray_head` cluster uses token authentication: a driver joining it brings the same token
ENV = dict(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **RAY_TOKEN_ENV)


def harness(*args, **kw):
    env = dict(os.environ, **ENV)
    return subprocess.run([*HARNESS, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def test_teacher_key_matches_training_blocks():
    from harness.orchestration.experiments import Experiment
    from harness.orchestration.plan import plan_runs
    from harness.orchestration.ray_scheduler import teacher_key

    specs = {s.method: s for s in plan_runs(Experiment.from_yaml(
        ROOT / "experiments/smollm2-default.yaml"))}
    assert teacher_key(specs["bitdistiller"]) == ("smollm2-135m", "smollm2-135m", 64, 256, 0.7,
                                                  50, 1.0)
    assert teacher_key(specs["onebit"]) == teacher_key(specs["bitdistiller"])
    # the sampling settings the run reads its data with, not the defaults: Ray generates the
    # data set the run will find in the cache
    bd = specs["bitdistiller"]
    vllm_like = bd.model_copy(update={"config": {**bd.config, "train": {
        **bd.config["train"], "teacher_top_k": 0}}})
    assert teacher_key(vllm_like)[5:] == (0, 1.0)
    rtn = next(s for s in plan_runs(Experiment.from_yaml(ROOT / "experiments/smoke.yaml"))
               if s.method == "rtn")
    assert teacher_key(rtn) is None


def test_smoke_experiment_through_ray_then_rerun_skips(tmp_path, ray_head):
    """The default: a Ray instance of its own, even with another cluster (``ray_head``)
    registered on this machine, which a bare ray.init() would join."""
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
        assert {"ppl", "ppl_ci95_low", "size_mb", "peak_rss_mb", "time_eval_s"} <= set(metrics)
        assert r.device == "cpu"
        # per-window NLLs cross the worker boundary too: the interval's and compare's input
        assert len(store.series(r.id)[("nll", "ppl")]) == metrics["ppl_tokens"] // 128
    qat = next(r for r in runs if r.method == "qat")
    assert [s.step for s in store.train_steps(qat.id)] == [1, 2, 3, 4]
    assert "packed" in store.artifacts(qat.id)

    again = harness("run", "experiments/smoke.yaml", "--db", db, "--output-dir",
                    tmp_path / "runs")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 run(s) already finished were reused" in again.stdout
    assert "ray:" not in again.stderr  # nothing pending: Ray is not even started
    assert all(r.attempts == 1 for r in Store(db, readonly=True).runs())


def _spool(tmp_path, text: str) -> Path:
    path = tmp_path / ".ray-records.jsonl"
    path.write_text(text)
    return path


STEP = '["train_step", {"step": %d, "loss": 2.5, "lr": 1e-05, "tokens_per_s": 10.0}]\n'


def test_spool_drops_only_a_torn_last_line(tmp_path):
    from harness.orchestration.ray_scheduler import read_spool

    whole = STEP % 1 + STEP % 2
    assert [kw["step"] for _, kw in read_spool(_spool(tmp_path, whole))] == [1, 2]
    torn = whole + (STEP % 3)[:25]  # SIGKILL in the middle of the third write
    assert [kw["step"] for _, kw in read_spool(_spool(tmp_path, torn))] == [1, 2]
    assert read_spool(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize("bad", ['{"not": "a record"}\n', "garbage\n", "\n"])
@pytest.mark.parametrize("where", ["middle", "last"])
def test_spool_damaged_at_a_complete_line_names_the_file_and_line(tmp_path, bad, where):
    from harness.errors import HarnessError
    from harness.orchestration.ray_scheduler import _recover, read_spool

    text = STEP % 1 + bad + STEP % 2 if where == "middle" else STEP % 1 + STEP % 2 + bad
    path = _spool(tmp_path, text)
    line = 2 if where == "middle" else 3
    with pytest.raises(HarnessError, match=f"{path} is damaged at line {line} "):
        read_spool(path)
    records, error = _recover(path, "worker died; rerun to resume")
    assert records == [] and error.startswith("worker died; rerun to resume; ")
    assert f"line {line}" in error and "delete that file" in error


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


def test_killed_worker_fails_cleanly_and_rerun_resumes(tmp_path, ray_head):
    from harness.orchestration.experiments import Experiment
    from harness.orchestration.plan import plan_runs
    from harness.orchestration.ray_scheduler import WORKER_DIED
    from harness.store import Store

    exp_file = tmp_path / "kill.yaml"
    exp_file.write_text(KILL)
    qat = next(s for s in plan_runs(Experiment.from_yaml(exp_file)) if s.method == "qat")
    db = f"sqlite:///{tmp_path / 'x.db'}"
    out = tmp_path / "runs"
    args = ["run", exp_file, "--no-fp", "--db", db, "--output-dir", out,
            "--ray-address", ray_head]
    env = dict(os.environ, **ENV)
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


def test_sigterm_to_the_driver_marks_runs_in_flight_failed_and_exits_143(tmp_path, ray_head):
    """ray.init replaces the driver's SIGTERM handler with sys.exit; ours is put back."""
    from harness.store import Store

    exp_file = tmp_path / "sig.yaml"
    exp_file.write_text(KILL.replace("steps: 30,", "steps: 3000,"))
    db = f"sqlite:///{tmp_path / 'x.db'}"
    out = tmp_path / "runs"
    env = dict(os.environ, **ENV)
    proc = subprocess.Popen([*HARNESS, "run", str(exp_file), "--no-fp", "--db", db,
                             "--output-dir", str(out), "--ray-address", ray_head], cwd=ROOT, env=env, text=True,
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


def test_a_cluster_that_refuses_the_driver_is_one_line(monkeypatch):
    """Reachable but refusing (a `ray start` cluster joined without RAY_AUTH_MODE=token): Ray
    raises ConnectionError after its retries; the harness says what to set."""
    import socket as socket_mod

    import ray

    from harness.errors import HarnessError
    from harness.ray_cluster import init_ray as _init_ray

    def refuse(**kw):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kw['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with socket_mod.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(HarnessError, match="could not join the Ray cluster at --ray-address "
                                               f"{address} .*RAY_AUTH_MODE=token"):
            _init_ray(address)
