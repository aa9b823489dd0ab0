"""SIGKILL a real ``harness run`` during training, evaluation and a database write; rerun the
same command and check the store: one finished row per spec, the killed (stale ``running``) row
reused, no missing or duplicated training steps, unique metrics.

The kill points are exact, not timed: a small wrapper (written per test) installs a hook and
then calls ``harness.cli.main``. ``eval`` and ``db-write`` SIGKILL the process from inside the
hook; ``hold-train`` holds training in step 5 until a signal has arrived, and the test sends it
from outside once the database shows three logged steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
ARGS = ["run", "--methods", "qat", "--model", "tiny-llama", "--max-eval-tokens", "256",
        "--seq-len", "128", "--tasks", "", "--set", f"train.steps={STEPS}",
        "--set", "train.checkpoint_every=2", "--set", "train.seq_len=32",
        "--set", "train.batch_size=1", "--set", "calib_samples=2", "--set", "calib_seq_len=32",
        "--set", "clip_tokens=32", "--set", "clip_grid=2", "--set", "data=corpus"]

WRAPPER = r'''
import os, signal, sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

mode = os.environ["FAULT_MODE"]
if mode == "hold-train":  # steps 1-3 logged, then wait in step 5's batch for the test's signal
    import time
    import harness.interrupts as interrupts
    import harness.train.trainer as trainer
    real_batch = trainer.batch_at
    def held(data, step, micro, cfg):
        # step index 4: the loss of step 3 was logged after step 4 was dispatched (lag one)
        while step >= 4 and interrupts._state["pending"] is None:
            time.sleep(0.02)  # SIGKILL ends it here; SIGTERM's handler sets "pending"
        return real_batch(data, step, micro, cfg)
    trainer.batch_at = held
elif mode == "eval":  # after the quantized run's PPL is stored, before the rest of its eval
    from harness.orchestration.recorders import StoreRecorder
    real_metric = StoreRecorder.metric
    def metric(self, name, value, task=None, **extra):
        real_metric(self, name, value, task, **extra)
        if name == "ppl" and self.store.get_run(self.run_id).method == "qat":
            die()
    StoreRecorder.metric = metric
elif mode == "db-write":  # INSERT of train step 3 sent, transaction not committed
    from sqlalchemy import event
    from sqlalchemy.orm import Session
    from harness.store import TrainStep
    @event.listens_for(Session, "after_flush")
    def kill_mid_transaction(session, _ctx):
        if any(isinstance(o, TrainStep) and o.step == 3 for o in session.new):
            die()

from harness.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def setup(tmp_path):
    wrapper = tmp_path / "faulty_harness.py"
    wrapper.write_text(WRAPPER)
    db = tmp_path / "h.db"
    argv = [*ARGS, "--db", f"sqlite:///{db}", "--output-dir", str(tmp_path / "runs")]
    return wrapper, db, argv


def _query(db: Path, sql: str, *params) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _qat_row(db: Path) -> tuple:
    [row] = _query(db, "SELECT id, status, attempts FROM runs WHERE method = 'qat'")
    return row


def _faulty(wrapper: Path, argv: list[str], mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(wrapper), *argv], cwd=ROOT,
                            env=_env(FAULT_MODE=mode, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rerun_and_check(db: Path, argv: list[str]) -> dict:
    """Reruns the plain command (in this process: the rerun needs no fault hook, and a second
    interpreter would cost seconds of imports) and checks the store; returns the qat run's
    metrics."""
    from harness.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, err.getvalue()[-3000:]
    runs = _query(db, "SELECT spec_hash, method, status FROM runs")
    assert sorted(m for _, m, _ in runs) == ["fp", "qat"]  # one row per spec
    assert len({h for h, _, _ in runs}) == len(runs)
    assert all(status == "finished" for _, _, status in runs), runs
    run_id, _, attempts = _qat_row(db)
    assert attempts == 2  # the stale 'running' row was reused, not duplicated
    steps = [s for (s,) in _query(db, "SELECT step FROM train_steps WHERE run_id = ? "
                                      "ORDER BY step", run_id)]
    assert steps == list(range(1, STEPS + 1))
    for rid, in _query(db, "SELECT id FROM runs"):
        keys = _query(db, "SELECT name, task FROM metrics WHERE run_id = ?", rid)
        assert len(keys) == len(set(keys)) and keys
    return dict(_query(db, "SELECT name, value FROM metrics WHERE run_id = ? AND task = ''",
                       run_id))


def _logged_steps(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        return _query(db, "SELECT count(*) FROM train_steps")[0][0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _signal_at_step_3(wrapper: Path, argv: list[str], db: Path, sig: int) -> tuple[int, str]:
    """Runs the command held at step 5, sends ``sig`` once 3 steps are logged; (exit code,
    stderr)."""
    proc = _faulty(wrapper, argv, "hold-train")
    deadline = time.monotonic() + 240
    try:
        while _logged_steps(db) < 3:
            assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "training never reached step 3"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_sigkill_during_training_resumes(setup):
    wrapper, db, argv = setup
    code, _ = _signal_at_step_3(wrapper, argv, db, signal.SIGKILL)
    assert code == -signal.SIGKILL
    _, status, attempts = _qat_row(db)
    assert (status, attempts) == ("running", 1)  # what a SIGKILL leaves behind
    [state] = [json.loads(p.read_text()) for p in db.parent.glob("runs/*/checkpoint/state.json")]
    metrics = _rerun_and_check(db, argv)
    assert metrics["resumed_from_step"] == state["step"] >= 2


def test_sigterm_during_training_checkpoints_the_step_and_exits_143(setup):
    """What `timeout`, SLURM or a preemptible machine sends: no step is lost, the row says why."""
    wrapper, db, argv = setup
    argv = [*argv, "--set", "train.checkpoint_every=100"]  # only the stop itself checkpoints
    code, err = _signal_at_step_3(wrapper, argv, db, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after training step" in err and "Traceback" not in err
    [(status, error)] = _query(db, "SELECT status, error FROM runs WHERE method = 'qat'")
    [state] = [json.loads(p.read_text()) for p in db.parent.glob("runs/*/checkpoint/state.json")]
    assert status == "failed" and f"after training step {state['step']} of {STEPS}" in error
    assert state["step"] == _logged_steps(db) < STEPS  # the step in flight was finished and kept
    metrics = _rerun_and_check(db, argv)
    assert metrics["resumed_from_step"] == state["step"]


def _self_killed(setup, point: str) -> int:
    """Runs the command with a hook that SIGKILLs the process at ``point``; returns the qat
    run's id after checking the kill left its row 'running'."""
    wrapper, db, argv = setup
    proc = _faulty(wrapper, argv, point)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    run_id, status, _ = _qat_row(db)
    assert status == "running"
    return run_id


def test_sigkill_during_evaluation_reruns_eval(setup):
    _, db, argv = setup
    _self_killed(setup, "eval")
    metrics = _rerun_and_check(db, argv)
    # Training had finished: the rerun resumes at the last step and trains nothing new.
    assert metrics["resumed_from_step"] == STEPS
    assert metrics["ppl"] > 0 and metrics["ppl_tokens"] == 256


def test_sigkill_inside_a_database_transaction_rolls_back(setup):
    _, db, argv = setup
    run_id = _self_killed(setup, "db-write")
    logged = [s for (s,) in _query(db, "SELECT step FROM train_steps WHERE run_id = ?", run_id)]
    assert logged == [1, 2]  # the uncommitted insert of step 3 is gone, the database is sound
    assert _query(db, "PRAGMA integrity_check") == [("ok",)]
    metrics = _rerun_and_check(db, argv)
    assert metrics["resumed_from_step"] == 2
