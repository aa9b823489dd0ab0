"""The body of a training worker (harness.train.distributed.train_shard) in a process group
started without Ray: on the CPU with gloo, and on a GPU with NCCL, the backend Ray Train gives
GPU workers (``gpu`` tier; the device machine has no Ray). One worker trains what one process
trains: the same path as N workers (FSDP2 shards, the weights from rank 0, the teacher from
rank 0, sharded checkpoints, the held-out selection), at N = 1.
"""

from __future__ import annotations

import copy
import json
import re
import socket

import pytest
import torch
from safetensors.torch import load_file

from harness.api import NullRecorder
from harness.config import EvalSpec, RunSpec
from harness.orchestration.runner import build_context
from harness.registry import build_method
from harness.train.distributed import RESULT_DIR, train_shard, worker_config, worker_inputs
from harness.train.model_transfer import as_skeleton
from harness.train.trainer import SHARDED_CHECKPOINT_DIR, train, trainable_parameters
from tests.helpers.net import free_port

TRAIN = {"steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "checkpoint_every": 2,
         "holdout": 0.1, "eval_every": 1, "select_best": True}
QAT_KD = {"bits": 2, "fmt": "intfz", "loss": "fkl", "data": "corpus", "calib_samples": 2,
          "calib_seq_len": 32, "clip_tokens": 32, "clip_grid": 2, "train": TRAIN}


def _prepared(tiny, tmp_path, device, shard_teacher: bool):
    """(model, objective, ctx, cfg) of a qat run distilling from tiny-llama, prepared (clipping
    init) on ``device``."""
    model, tok = tiny
    config = {**QAT_KD, "train": {**TRAIN, "teacher_shard": shard_teacher}}
    spec = RunSpec(model="tiny-llama", method="qat", config=config, eval=EvalSpec())
    method = build_method(spec)
    student = copy.deepcopy(model).to(device)
    ctx = build_context(spec, method, student, tok, NullRecorder(), tmp_path, device)
    torch.manual_seed(0)
    prepared = method.prepare(student, ctx)
    return prepared, method.objective(ctx), ctx, method.config.train


def _on_one_worker(model, objective, ctx, cfg, backend: str, device) -> tuple[dict, dict]:
    """What the run's process and one worker do in train_distributed, Ray left out: the inputs
    and the config it makes, the skeleton (copied as Ray pickles it: meta tensors, shared state
    kept), then train_shard in a process group of one. Returns (trained parameters,
    result.json)."""
    import torch.distributed as dist

    weights, data, held = worker_inputs(model, objective, cfg, ctx)
    with as_skeleton(model):
        skeleton, obj = copy.deepcopy((model, objective))
    config = worker_config(cfg, ctx, weights, 1, device.type == "cuda")
    # A worker takes its share of the cores; here it shares this process, which trained the
    # reference with the threads it has (one under pytest-xdist): the same count, the same sums
    threads = torch.get_num_threads()
    config["threads"] = threads
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        train_shard(skeleton, obj, data, held, config, device)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
    out = ctx.run_dir / RESULT_DIR
    return load_file(str(out / "params.safetensors")), json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("device, shard_teacher", [
    ("cpu", True),
    pytest.param("cuda", False, marks=pytest.mark.gpu),
    pytest.param("cuda", True, marks=pytest.mark.gpu),
])
def test_one_worker_trains_what_one_process_trains(tiny, tmp_path, device, shard_teacher):
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    one, objective, ctx, cfg = _prepared(tiny, tmp_path / "one", dev, shard_teacher)
    result = train(one, objective, cfg, ctx, progress=False)
    worker, objective_w, ctx_w, cfg_w = _prepared(tiny, tmp_path / "worker", dev, shard_teacher)
    params, meta = _on_one_worker(worker, objective_w, ctx_w, cfg_w, backend, dev)

    assert (ctx_w.run_dir / SHARDED_CHECKPOINT_DIR / "state.json").exists()
    assert meta["workers"] == 1 and meta["teacher_sharded"] is shard_teacher
    losses = [loss for _, loss, _, _ in meta["history"]]
    assert len(losses) == cfg.steps and all(torch.isfinite(torch.tensor(losses)))
    # bf16 autocast on the GPU: the sharded teacher casts each gathered fp32 weight, the whole
    # one keeps bf16 copies; the same products up to summation order
    rel = 1e-5 if dev.type == "cpu" else 2e-2
    assert losses[-1] == pytest.approx(result["final_loss"], rel=rel)
    assert meta["selection"]["best_step"] == result["best_step"]
    trained = dict(trainable_parameters(one))
    assert set(params) == set(trained)
    for name, value in params.items():
        mine = trained[name].detach().cpu()
        if dev.type == "cpu":
            torch.testing.assert_close(value, mine, rtol=1e-5, atol=1e-6)
        else:  # AdamW moves each weight by about lr a step, and by its sign where bf16 noise
            # rules the gradient: most weights agree, a whole step apart none would
            assert (value - mine).abs().mean() < 0.2 * cfg.lr, name


def test_a_worker_that_does_not_see_the_run_folder_names_the_node_and_the_fix(tmp_path):
    """A node that does not mount the run folder (multi-node without shared storage) would
    write its checkpoint shards where no other worker reads them: it stops in one line."""
    import torch.distributed as dist

    from harness.errors import HarnessError

    config = {"weights": str(tmp_path / "run" / "distributed-input" / "model.safetensors")}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(HarnessError, match=rf"worker 0 on {socket.gethostname()} does not "
                           rf"see the run folder {re.escape(str(tmp_path / 'run'))} .*"
                           rf"--output-dir on storage every node"):
            train_shard(None, None, None, None, config, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
