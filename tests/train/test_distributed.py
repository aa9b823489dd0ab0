"""One run's training on several Ray Train workers with FSDP2 (harness.train.distributed).

The end-to-end test starts a two-node Ray cluster on this machine (``ray start --head``, then a
second raylet with ``ray start --address``, one CPU each), runs the same quick bitdistiller run
(clipping init, teacher data, CAKLD against the frozen teacher) in one process and, through
``--ray-address``, on 2 gloo workers (one per node) that sample the teacher data and hold the
teacher sharded; kills one worker mid-training, resumes on 1 worker from the sharded checkpoint,
and compares with the single-process run: the same teacher data, the same curve, the same
perplexity, one finished row.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.train.config import TrainConfig
from harness.train.distributed import check_distributable, worker_share
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# 65 teacher samples: two generation batches of 64 prompts, so each worker samples one
ARGS = ["run", "--methods", "bitdistiller", "--model", "tiny-llama", "--no-fp", "--tasks", "",
        "--max-eval-tokens", "256", "--seq-len", "128", "--set", f"train.steps={STEPS}",
        "--set", "train.checkpoint_every=2", "--set", "train.seq_len=32",
        "--set", "train.batch_size=3", "--set", "train.teacher_samples=65",
        "--set", "train.teacher_new_tokens=8", "--set", "calib_samples=2",
        "--set", "calib_seq_len=32", "--set", "clip_tokens=32", "--set", "clip_grid=2",
        "--set", "train.holdout=0.02", "--set", "train.select_best=true",
        "--set", "train.eval_every=2",  # the held-out selection's state crosses the resume
        "--set", "train.lr=1e-3"]  # the held-out loss rises after step 2: step 2 is selected
# on the workers: 3 sequences over 2 workers in pieces of 1 (rank 1 runs an empty piece,
# weighted 0); the one held-out sample's blocks leave rank 1 without held-out rows in the last
# held-out batch; the teacher sharded over the workers
ON_WORKERS = ["--set", "train.micro_batch=1", "--set", "train.teacher_shard=true"]

# Ray starts the workers from this interpreter's environment: PYTHONPATH puts this module first,
# and it makes rank 1 SIGKILL itself when it takes the batch of FAULT_KILL_AT_STEP (0-based).
SITECUSTOMIZE = r'''
import importlib.abc, importlib.util, os, signal, sys
AT = os.environ.get("FAULT_KILL_AT_STEP")

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "harness.train.distributed":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module
        def exec_module(module):
            real_exec(module)
            share = module.worker_share
            def killing(data, step, micro, cfg, rank, workers):
                if rank == 1 and step == int(AT):
                    os.kill(os.getpid(), signal.SIGKILL)
                return share(data, step, micro, cfg, rank, workers)
            module.worker_share = killing
        spec.loader.exec_module = exec_module
        return spec

if AT:
    sys.meta_path.insert(0, _Hook())
'''


def test_worker_shares_partition_each_micro_batch():
    cfg = TrainConfig(batch_size=4, seq_len=8, grad_accum=2)
    data = torch.arange(40).view(10, 4)
    for step, micro in ((0, 0), (0, 1), (3, 1)):
        rows = torch.cat([worker_share(data, step, micro, cfg, r, 2) for r in range(2)])
        whole = data[(torch.arange(4) + (step * 2 + micro) * 4) % 10]
        assert sorted(rows[:, 0].tolist()) == sorted(whole[:, 0].tolist())
        assert worker_share(data, step, micro, cfg, 0, 2).size(0) == 2


@pytest.mark.parametrize("cfg, workers, words", [
    (TrainConfig(batch_size=2), 3, "leaves some of 3 workers without a sequence"),
    (TrainConfig(), 0, "expected 1 or more"),
])
def test_settings_that_workers_cannot_reproduce_are_refused(cfg, workers, words):
    with pytest.raises(HarnessError, match=words):
        check_distributable(cfg, workers)


def test_trainer_drops_the_placement_group_cleaner_only_without_a_dashboard(monkeypatch):
    """Without a dashboard the cleaner's state-API questions hang, and each fit() waited 12 s
    for it to stop; with one it stays."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train")
    from ray._private import worker
    from ray.train import ScalingConfig

    from harness.ray_cluster import init_ray
    from harness.train.distributed import _trainer_class

    def callbacks() -> set[str]:
        trainer = _trainer_class()(lambda config: None,
                                   scaling_config=ScalingConfig(num_workers=1))
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    assert init_ray(None)  # a local instance: no dashboard
    try:
        without = callbacks()
        assert "PlacementGroupCleanerCallback" not in without
        assert "BackendSetupCallback" in without  # the rest is Ray Train's own
        monkeypatch.setattr(worker, "get_dashboard_url", lambda: "127.0.0.1:8265")
        assert "PlacementGroupCleanerCallback" in callbacks()
    finally:
        ray.shutdown()


@pytest.mark.parametrize("flags, words", [
    (["--set", "train.batch_size=1", "--workers-per-run", "2"], "without a sequence"),
    (["--workers-per-run", "0"], "expected 1 or more workers"),
    (["--gpus-per-run", "2.5"], "above 1 a run spans whole GPUs"),
    (["--gpus-per-run", "2", "--workers-per-run", "4"], "disagree"),
])
def test_cli_refuses_bad_worker_settings_before_any_row(cli, tmp_path, flags, words):
    db = tmp_path / "h.db"
    code, _, err = cli(*ARGS, *flags, "--db", f"sqlite:///{db}", "--output-dir",
                       tmp_path / "runs")
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not db.exists() or not _query(db, "SELECT id FROM runs")


def _query(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
            "HARNESS_CACHE": str(_fresh_teacher_cache(tmp_path)), **extra}


def _fresh_teacher_cache(tmp_path: Path) -> Path:
    """A cache folder with no teacher data (the workers must sample it) that shares the rest
    (corpus, models, tokens) with this process's cache."""
    from harness.paths import cache_dir

    root = tmp_path / "cache"
    if not root.exists():
        root.mkdir()
        for entry in cache_dir().iterdir():
            if entry.name != "teacher":
                (root / entry.name).symlink_to(entry)
    return root


def _teacher_file(cache: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    [path] = (cache / "teacher").iterdir()
    return load_file(str(path))["sequences"]


def _harness(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *argv], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=400)


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second raylet, one CPU each, started the way a user starts a cluster; their
    workers kill rank 1 at step index 2 (FAULT_KILL_AT_STEP). Yields the address."""
    pytest.importorskip("ray.train")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = _env(tmp_path, FAULT_KILL_AT_STEP="2")
    common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
    logs = [tmp_path / "head.log", tmp_path / "node2.log"]
    nodes = [subprocess.Popen([ray, "start", "--head", "--port", str(port),
                               "--include-dashboard", "false", *common], start_new_session=True,
                              env=env, stdout=logs[0].open("w"), stderr=subprocess.STDOUT)]
    try:
        _wait(lambda: _started(logs[0]), "the head", nodes)
        nodes.append(subprocess.Popen([ray, "start", "--address", address, *common],
                                      env=env, stdout=logs[1].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        _wait(lambda: _started(logs[1]), "the second raylet", nodes)
        yield address
    finally:
        for node in reversed(nodes):  # --block: SIGTERM stops that node's processes...
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=2)
            except subprocess.TimeoutExpired:  # ...after its workers, which can take 30 s
                pass
            with contextlib.suppress(ProcessLookupError):  # its own session: only its own
                os.killpg(node.pid, signal.SIGKILL)


def _started(log: Path) -> bool:
    return "Ray runtime started" in log.read_text(errors="replace")


def _wait(ready, what: str, nodes: list, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert all(n.poll() is None for n in nodes), f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.5)


def _curve_and_ppl(db: Path) -> tuple[list[tuple[int, float]], float, str, str]:
    [(run_id, key, status)] = _query(db, "SELECT id, run_key, status FROM runs")
    steps = _query(db, f"SELECT step, loss FROM train_steps WHERE run_id = {run_id} ORDER BY step")
    [(ppl,)] = _query(db, f"SELECT value FROM metrics WHERE run_id = {run_id} AND name = 'ppl'")
    return steps, ppl, key, status


def test_two_nodes_two_workers_killed_then_resumed_on_one_equal_the_single_process_run(
        tmp_path, two_nodes, cli, monkeypatch):
    from harness.train import teacher_data

    plain_db, dist_db = tmp_path / "plain.db", tmp_path / "dist.db"
    monkeypatch.setattr(teacher_data, "cache_dir", lambda: tmp_path / "plain-cache")
    code, _, err = cli(*ARGS, "--db", f"sqlite:///{plain_db}", "--output-dir",
                       tmp_path / "plain")  # in this process: no Ray, no fault hook
    assert code == 0, err[-3000:]
    argv = [*ARGS, *ON_WORKERS, "--db", f"sqlite:///{dist_db}", "--output-dir",
            str(tmp_path / "dist")]
    remote = ["--ray-address", two_nodes]

    killed = _harness([*argv, *remote, "--workers-per-run", "2"], tmp_path)
    assert killed.returncode == 1, killed.stderr[-3000:]
    [(status, error)] = _query(dist_db, "SELECT status, error FROM runs")
    assert status == "failed" and "rerun to resume" in error, error
    assert "worker" in error and "\n" not in error, error  # one line, naming what failed
    # the teacher data: sampled by the 2 workers, what this process sampled alone
    [(sampled_on,)] = _query(dist_db, "SELECT value FROM metrics "
                                      "WHERE name = 'teacher_data_workers'")
    assert sampled_on == 2
    assert torch.equal(_teacher_file(tmp_path / "cache"), _teacher_file(tmp_path / "plain-cache"))
    [run_dir] = (tmp_path / "dist").iterdir()
    state = (run_dir / "checkpoint-sharded" / "state.json").read_text()
    assert '"step": 2' in state and '"workers": 2' in state

    # the single-process trainer does not silently restart over the sharded checkpoint
    code, _, err = cli(*argv)
    assert code == 1 and "--workers-per-run" in err, err[-2000:]

    resumed = _harness([*argv, *remote, "--workers-per-run", "1"], tmp_path)  # another count
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_steps, ref_ppl, ref_key, _ = _curve_and_ppl(plain_db)
    steps, ppl, key, status = _curve_and_ppl(dist_db)
    assert status == "finished" and key == ref_key  # the worker count is not in the run key
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))  # the whole curve, once
    for (_, a), (_, b) in zip(steps, ref_steps, strict=True):
        assert a == pytest.approx(b, rel=1e-3)
    # 1e-4, not the 0.5% the same result needs: the last step's weights give a PPL 0.14%
    # off the selected step's, which this must tell apart
    assert ppl == pytest.approx(ref_ppl, rel=1e-4)
    metrics = dict(_query(dist_db, "SELECT name, value FROM metrics WHERE task = ''"))
    ref = dict(_query(plain_db, "SELECT name, value FROM metrics WHERE task = ''"))
    # the best step's weights, gathered at step 2 and kept in the sharded checkpoint, are the
    # ones evaluated after the resumed run's last step
    assert metrics["best_step"] == ref["best_step"] == 2
    for name in ("holdout_loss", "holdout_loss_last"):  # at step 2, then after the resume
        assert metrics[name] == pytest.approx(ref[name], rel=1e-3)
    assert metrics["resumed_from_step"] == 2 and metrics["train_workers"] == 1
    assert metrics["train_teacher_sharded"] == 1 and "train_teacher_sharded" not in ref
    assert 100 < metrics["peak_rss_mb_train_worker"] < 20_000  # the worker's, in MB


def _step_grads(model, cfg: TrainConfig, data: torch.Tensor, rank: int, workers: int) -> tuple:
    """One optimizer_step of ``rank``'s share with a no-op optimizer: (loss, gradients)."""
    from contextlib import nullcontext

    from harness.api import Objective
    from harness.train.losses import get_loss
    from harness.train.trainer import optimizer_step

    ce = get_loss("ce")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    loss = optimizer_step(model, None, Objective(loss=lambda inputs: ce(inputs)), opt, params,
                          lambda s, m: worker_share(data, s, m, cfg, rank, workers), 0,
                          cfg.model_copy(update={"grad_clip": None}), nullcontext(), workers)
    return float(loss), [p.grad.clone() for p in params]


@pytest.mark.parametrize("batch, workers, micro", [(4, 1, 3), (5, 2, None), (5, 2, 1),
                                                   (3, 2, 1)])
def test_uneven_shares_and_pieces_give_the_global_batch_step(tiny_copy, batch, workers, micro):
    """Each worker's share (uneven where batch % workers, in pieces of train.micro_batch; a
    piece left empty weighted 0) weighted by its rows, the workers' gradients averaged as FSDP
    does and their losses summed / N: the single-process step of the whole micro-batch."""
    model, _ = tiny_copy
    data = torch.randint(0, 500, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=batch, seq_len=16, grad_accum=2)
    ref_loss, ref_grads = _step_grads(model, cfg, data, 0, 1)
    split = cfg.model_copy(update={"micro_batch": micro})
    results = [_step_grads(model, split, data, r, workers) for r in range(workers)]
    assert sum(loss for loss, _ in results) / workers == pytest.approx(ref_loss, rel=1e-5)
    for i, ref in enumerate(ref_grads):
        mean = sum(grads[i] for _, grads in results) / workers
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-6)


def test_a_workers_error_line_quotes_its_own_exception():
    from harness.ray_cluster import worker_failure_line

    ray_text = ("Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\n"
                "Traceback (most recent call last):\n  File \"w.py\", line 3, in loop\n"
                "    step()\nValueError: not enough values to unpack (expected 6, got 5)\n")
    line = worker_failure_line(RuntimeError(ray_text), 2, "training", "rerun to resume")
    assert line == ("training on the workers failed (2 workers: ValueError: not enough values "
                    "to unpack (expected 6, got 5)); rerun to resume")
    died = worker_failure_line(RuntimeError("The actor died unexpectedly before finishing"), 2,
                               "teacher-data", "rerun to sample them again")
    assert died.startswith("a teacher-data worker died (2 workers: The actor died")
    harness = worker_failure_line(RuntimeError("x\nHarnessError: train.lr is NaN; fix it\n"), 2,
                                  "training", "rerun")
    assert harness == "train.lr is NaN; fix it"  # the harness's own line, as it is
