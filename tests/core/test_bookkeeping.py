"""Run bookkeeping across attempts, folders and processes (found by an audit of the store)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.store import Store, owner_tag

QAT = ["run", "--methods", "qat", "--bits", "2", "--model", "tiny-llama",
       "--max-eval-tokens", "512", "--seq-len", "128", "--tasks", "", "--no-fp",
       "--set", "data=corpus", "--set", "train.steps=3", "--set", "train.seq_len=32",
       "--set", "train.batch_size=1"]


@pytest.fixture
def qat(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'h.db'}"

    def run(*extra):
        code, out, err = cli(*QAT, "--db", db, "--output-dir", tmp_path / "runs", *extra)
        assert code == 0, err
        return Store(db)

    return run


def _only_run(store):
    (run,) = store.runs()
    return run, store.metric_dict(run.id), [s.step for s in store.train_steps(run.id)]


def test_a_rerun_after_the_last_checkpoint_keeps_the_training_metrics(qat):
    """Stopped after training (during evaluation, say), the rerun reloads the final
    checkpoint and trains nothing: it used to store no final_train_loss nor training time."""
    store = qat()
    run, first, _ = _only_run(store)
    store.end_run(run.id, "failed", "interrupted by SIGTERM")
    store = qat()
    run, again, steps = _only_run(store)
    assert run.status == "finished" and again["resumed_from_step"] == 3
    assert again["final_train_loss"] == pytest.approx(first["final_train_loss"])
    assert again["train_steps_s_total"] == pytest.approx(first["train_steps_s_total"])
    assert steps == [1, 2, 3]


def test_force_retrains_instead_of_reloading_the_final_checkpoint(qat):
    qat()
    store = qat("--force")
    run, metrics, steps = _only_run(store)
    assert run.attempts == 2 and "resumed_from_step" not in metrics
    assert steps == [1, 2, 3]


def test_steps_of_an_attempt_killed_before_its_first_checkpoint_are_dropped(qat, tmp_path):
    """A rerun that starts over from step 0 kept the dead attempt's rows beyond its own
    steps: one curve mixing two trainings."""
    store = qat()
    run, _, _ = _only_run(store)
    for step in range(4, 9):  # what a longer, killed attempt had logged
        store.add_train_step(run.id, step, 9.0, 1e-5, 100.0)
    store.end_run(run.id, "failed", "killed")
    import shutil

    shutil.rmtree(tmp_path / "runs" / run.run_key / "checkpoint")
    store = qat()
    assert _only_run(store)[2] == [1, 2, 3]


def test_run_folders_are_absolute_so_exports_work_from_anywhere(cli, tmp_path, monkeypatch):
    """`--output-dir runs` (the default) stored `runs/KEY/packed.safetensors`, which
    `harness export` and `harness eval` could not find from another folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    db = f"sqlite:///{tmp_path / 'h.db'}"
    code, _, err = cli("run", "--methods", "rtn", "--bits", "2", "--model", "tiny-llama",
                       "--max-eval-tokens", "512", "--seq-len", "128", "--tasks", "",
                       "--no-fp", "--db", db, "--output-dir", "runs")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("list", "--json", "--db", db)
    key = json.loads(out)[0]["run_key"]
    code, out, err = cli("export", key, tmp_path / "export", "--packed", "--db", db)
    assert code == 0, err
    assert (tmp_path / "export").is_dir()


def test_a_run_another_live_process_runs_is_not_taken_over(tmp_path):
    """Two terminals sharing the FP reference: the second reran the first one's live run,
    deleting its metrics (and a Ctrl-C there marked it failed)."""
    from harness.orchestration.plan import build_spec
    from harness.orchestration.scheduler import execute

    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    spec = build_spec("tiny-llama", "fp", {}, "quick", 0, {"max_tokens": 512, "seq_len": 128,
                                                          "tasks": ()})
    run = store.begin_run(spec)
    store.add_metric(run.id, "ppl", 42.0)  # written so far by the other process
    # a live process whose command line names the harness, standing in for `harness run`
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "harness"])
    try:
        with store.session() as s, s.begin():
            from harness.store import Run

            s.get(Run, run.id).host = owner_tag().rsplit(" pid ", 1)[0] + f" pid {other.pid}"
        (outcome,) = execute([spec], store, tmp_path / "runs", progress=False)
        assert outcome.status == "busy" and str(other.pid) in outcome.error
        assert store.metric_dict(run.id) == {"ppl": 42.0}
        assert store.get_run(run.id).status == "running"
    finally:
        other.kill()
        other.wait()
    (outcome,) = execute([spec], store, tmp_path / "runs", progress=False)
    assert outcome.status == "finished"  # its owner is gone: the rerun takes it over


def test_two_processes_beginning_one_run_do_not_crash(tmp_path):
    """begin_run selected, then inserted: a second process inserting the same run in between
    died on the unique constraint (6 of 6 tries in the audit)."""
    script = f"""
import sys
from harness.orchestration.plan import build_spec
from harness.store import RunBusy, Store
spec = build_spec("tiny-llama", "fp", {{}}, "quick", 0, {{"max_tokens": 512, "seq_len": 128}})
store = Store("sqlite:///{tmp_path / 'race.db'}")
sys.stdin.readline()  # both start together
try:
    store.begin_run(spec)
except RunBusy:  # the right answer for a loser: the winner (alive) runs it
    pass
"""
    Store(f"sqlite:///{tmp_path / 'race.db'}")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    import time

    time.sleep(8)  # imports done
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert len(Store(f"sqlite:///{tmp_path / 'race.db'}").runs()) == 1
