"""harness.memory_plan: parameter counts from configs, the dry run, the refusal, sharding."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from harness.cli import main
from harness.memory_plan import GiB, ModelShape, estimate

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu"}
# the papers' BitDistiller settings (experiments/llama2-7b-bitdistiller.yaml)
BD_TRAIN = {"steps": 200, "batch_size": 8, "grad_accum": 16, "seq_len": 1024,
            "trainable": "non_embedding", "teacher_samples": 8000}


def _numel(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
    LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                attention_bias=True, mlp_bias=True),
    LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k not in ("architectures",
                                                                   "model_type")}),
], ids=["tiny-tied-gqa", "gqa-untied", "head_dim-bias", "llama2-7b"])
def test_parameter_count_equals_the_models_numel(config):
    assert ModelShape.from_config(config).params == _numel(config)


def test_tiny_llama_count_matches_the_real_model():
    from harness.models import load_model, model_config

    shape = ModelShape.from_config(model_config("tiny-llama"))
    model, _ = load_model("tiny-llama")
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_dry_run_prints_a_table_and_stores_nothing(tmp_path, capsys):
    db = tmp_path / "h.db"
    rc = main(["run", "--model", "tiny-llama", "--methods", "rtn,qat", "--bits", "3",
               "--dry-run", "--db", f"sqlite:///{db}", "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "peak GiB (phase)" in out and "fits" in out
    assert len(re.findall(r"\b(fp|rtn|qat)\b .* yes\s*$", out, re.M)) == 3
    assert not db.exists() and not (tmp_path / "runs").exists()
    # training runs also show the activations and the peak with activation checkpointing
    assert "activations ckpt GiB" in out and "peak ckpt GiB (phase)" in out
    assert main(["run", "--model", "smollm2-135m", "--methods", "rtn,qat", "--bits", "3",
                 "--dry-run", "--db", f"sqlite:///{db}"]) == 0
    out = capsys.readouterr().out
    [qat] = [line.split() for line in out.splitlines() if re.search(r"\bqat\b", line)]
    [rtn] = [line.split() for line in out.splitlines() if re.search(r"\brtn\b", line)]
    acts, acts_ckpt = float(qat[8]), float(qat[-5])  # ... ckpt acts, ckpt peak (phase)
    assert acts_ckpt < acts and rtn[-4] == rtn[-3] == "-"


def test_a_run_that_cannot_fit_is_refused_in_one_line(tmp_path, capsys):
    db = tmp_path / "h.db"
    rc = main(["run", "--model", "tiny-llama", "--methods", "qat", "--bits", "3", "--dry-run",
               "--device-mem", "0.001", "--db", f"sqlite:///{db}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for option in ("more workers", "checkpointing", "train.micro_batch"):
        assert option in err
    assert not db.exists()


def _plan_7b(tmp_path, gpus: int, method: str = "bitdistiller", mem: int = 80,
             device: str = "cuda") -> int:
    folder = tmp_path / "llama2-7b"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    workers = ["--gpus-per-run", str(gpus)] if device == "cuda" else [
        "--workers-per-run", str(gpus)]
    return main(["run", f"experiments/llama2-7b-{method}.yaml", "--model", str(folder),
                 "--methods", method, "--tasks", "", "--device", device, *workers,
                 "--device-mem", str(mem), "--dry-run", "--db", f"sqlite:///{tmp_path / 'h.db'}"])


def test_the_plan_shards_the_teacher_where_a_whole_copy_per_worker_does_not_fit(tmp_path,
                                                                                  capsys):
    """7B onebit on 4 GPUs: a whole bf16 teacher per worker plans about 70.7 GiB, sharded
    about 65.7 (1/4 of fp32 + two gathered layers): kept whole on 80 GiB, sharded on 68."""
    assert _plan_7b(tmp_path / "80", 4, "onebit", 80) == 0
    out = capsys.readouterr().out
    assert re.search(r"onebit .* 12\.80 .* yes\s*$", out, re.M) and "sharded" not in out, out
    assert _plan_7b(tmp_path / "68", 4, "onebit", 68) == 0
    out = capsys.readouterr().out
    assert re.search(r"onebit .* 7\.78 sharded .* yes\s*$", out, re.M), out
    # on the CPU a worker loads the whole teacher before sharding it: nothing to gain
    assert _plan_7b(tmp_path / "cpu", 4, "onebit", 68, device="cpu") == 2
    assert "sharded" not in capsys.readouterr().out


def test_a_ray_scheduled_file_with_workers_is_fitted_before_it_starts(tmp_path, cli):
    """The papers' files schedule with Ray, but a run with workers starts from this process:
    it is fitted to the device as its dry-run says (here the sharded teacher), not only
    planned. (No GPU here: the run then stops at --device cuda.)"""
    folder = tmp_path / "llama2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    code, out, err = cli("run", "experiments/llama2-7b-onebit.yaml", "--model", folder,
                         "--methods", "onebit", "--no-fp", "--tasks", "", "--ppl-data",
                         "shakespeare", "--device", "cuda", "--gpus-per-run", "4",
                         "--device-mem", "68", "--db", f"sqlite:///{tmp_path / 'h.db'}",
                         "--output-dir", tmp_path / "runs")
    assert code != 0
    assert re.search(r"onebit\): a whole teacher on each of the 4 workers does not fit cuda "
                     r"\(68\.00 GiB.*train\.teacher_shard=true", out), out + err


def test_llama2_7b_bitdistiller_refused_on_one_80gb_gpu_accepted_on_8(tmp_path, capsys):
    assert _plan_7b(tmp_path / "one", 1) == 2
    err = capsys.readouterr().err
    assert "bitdistiller" in err and "80.00 GiB" in err and "--gpus-per-run 4" in err
    assert _plan_7b(tmp_path / "eight", 8) == 0
    out = capsys.readouterr().out
    assert re.search(r"bitdistiller .* yes\s*$", out, re.M), out
    # whose peak it is: a worker's in training, the run's own process's in evaluation
    assert re.search(r"bitdistiller .*\(train, each worker\)", out), out
    assert re.search(r"fp .*\(eval, run process\)", out), out


def test_sharding_over_8_workers_fits_80gb():
    shape = ModelShape.from_config(LlamaConfig(**{k: v for k, v in LLAMA2_7B.items()
                                                  if k not in ("architectures", "model_type")}))
    config = {"gamma": "paper", "train": BD_TRAIN}
    kw = dict(eval_seq_len=2048, teacher=True, calibration=(16, 512), device_type="cuda")
    one = estimate(shape, "bitdistiller", config, workers=1, **kw)
    eight = estimate(shape, "bitdistiller", config, workers=8, **kw)
    ckpt = estimate(shape, "bitdistiller", config, workers=8, grad_checkpointing=True, **kw)
    assert one.total > 80 * GiB and eight.total <= 80 * GiB
    assert ckpt.phases["train"] < eight.phases["train"]  # training alone is sharded
    # weights, gradients and AdamW shard by the workers; the teacher is whole on each worker
    for k in ("weights", "grads", "adamw"):
        assert eight.components[k] == pytest.approx(one.components[k] / 8, rel=1e-6)
    assert eight.components["teacher"] == one.components["teacher"]
    # ...or sharded: its fp32 eighth and two layers gathered whole
    sharded = estimate(shape, "bitdistiller", config, workers=8, teacher_shard=True, **kw)
    assert sharded.components["teacher"] == math.ceil(shape.params * 4 / 8) \
        + 2 * shape.layer_params * 4
    assert sharded.phases["train"] < eight.phases["train"]
    # CAKLD's gamma is estimated in the run's own process on whole batches, whatever the workers
    assert eight.components["gamma"] == one.components["gamma"] > 0
    # the micro-batch of 8 sequences is the global one: 1 sequence per worker
    assert eight.components["logits"] == pytest.approx(one.components["logits"] / 8, rel=1e-6)
    # fp32 master weights + grads + AdamW: 16 bytes per trainable parameter (6.5B)
    assert one.components["grads"] + one.components["adamw"] == 12 * shape.trainable_params(
        "non_embedding")


def test_with_gpu_workers_the_gamma_step_holds_the_teacher_but_not_the_student():
    """The run's own process estimates CAKLD's gamma with the student parked in host memory
    when GPU workers train it (runner._park_on_host); alone, or on the CPU, it holds both."""
    shape = ModelShape.from_config(LlamaConfig(**{k: v for k, v in LLAMA2_7B.items()
                                                  if k not in ("architectures", "model_type")}))
    config = {"gamma": "paper", "train": BD_TRAIN}
    kw = dict(eval_seq_len=2048, teacher=True, calibration=(16, 512))
    full = shape.params * 4
    one = estimate(shape, "bitdistiller", config, workers=1, device_type="cuda", **kw)
    eight = estimate(shape, "bitdistiller", config, workers=8, device_type="cuda", **kw)
    cpu = estimate(shape, "bitdistiller", config, workers=8, device_type="cpu", **kw)
    assert one.phases["objective"] - eight.phases["objective"] == full
    assert cpu.phases["objective"] - cpu.components["runtime"] == \
        one.phases["objective"] - one.components["runtime"]
    # so on 8 GPUs the peak is a worker's training, no longer the gamma step (53.16 GiB)
    assert eight.phase == "train" and eight.total < 47 * GiB


def test_activations_checkpointing_keeps_one_residual_per_layer():
    shape = ModelShape(vocab=100, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16,
                       intermediate=128, tied=True)
    config = {"train": {"batch_size": 2, "seq_len": 32, "trainable": "non_embedding"}}
    full = estimate(shape, "qat", config, eval_seq_len=64)
    ckpt = estimate(shape, "qat", config, eval_seq_len=64, grad_checkpointing=True)
    assert ckpt.components["activations"] < full.components["activations"]
    assert ckpt.components["activations"] == 4 * 64 * 64 * 4 + full.components["activations"] // 4


def test_with_workers_the_runs_own_process_is_planned_without_their_training():
    """The run's process evaluates on top of what it did itself (prepare, writing the weights
    for the workers), not of the workers' training; on the CPU the largest worker (rank 0,
    which reads the weights and broadcasts them) holds its shard plus the whole model once."""
    shape = ModelShape(vocab=100, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16,
                       intermediate=128, tied=True)
    small = {"train": {"batch_size": 2, "seq_len": 32, "trainable": "non_embedding"}}
    big = {"train": {**small["train"], "batch_size": 64}}
    one = [estimate(shape, "qat", c, eval_seq_len=64) for c in (small, big)]
    two = [estimate(shape, "qat", c, eval_seq_len=64, workers=2) for c in (small, big)]
    assert one[1].phases["eval"] > one[0].phases["eval"]  # one process: eval after training
    assert two[1].phases["eval"] == two[0].phases["eval"]  # workers: not in this process
    full = shape.params * 4
    assert two[0].components["weights"] == math.ceil(full / 2) + full


def test_pieces_of_a_share_hold_the_activations_of_their_rows_only():
    shape = ModelShape(vocab=100, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16,
                       intermediate=128, tied=True)
    train = {"batch_size": 6, "seq_len": 32, "trainable": "non_embedding"}
    whole = estimate(shape, "qat", {"train": train}, eval_seq_len=64, workers=2)
    pieces = estimate(shape, "qat", {"train": {**train, "micro_batch": 2}}, eval_seq_len=64,
                      workers=2)
    # 3 rows per worker in pieces of 2: 2 pieces of at most 2 rows
    assert pieces.components["logits"] * 3 == whole.components["logits"] * 2
    assert pieces.components["activations"] < whole.components["activations"]
    assert pieces.components["adamw"] == whole.components["adamw"]


@pytest.mark.parametrize("method, config", [
    ("qat", {"bits": 3, "fmt": "int", "clip": False}),
    ("qat", {"bits": 3, "fmt": "nf3", "clip": False}),
    ("qat", {"bits": 3, "fmt": "intfz", "clip": False}),
    ("qat", {"bits": 2, "fmt": "ternary", "clip": False}),
    ("onebit", {}),
])
def test_saved_bytes_per_weight_are_what_a_layer_keeps_for_backward(tiny_copy, tmp_path,
                                                                   method, config):
    """The planner's per-format constant against the tensors autograd actually saves in one
    training-form layer's forward (the input excluded)."""
    from harness.api import NullRecorder
    from harness.config import EvalSpec, RunSpec
    from harness.memory_plan import SAVED_BYTES_PER_WEIGHT
    from harness.orchestration.runner import build_context
    from harness.registry import build_method

    model, tok = tiny_copy
    spec = RunSpec(model="tiny-llama", method=method, config=config, eval=EvalSpec())
    m = build_method(spec)
    ctx = build_context(spec, m, model, tok, NullRecorder(), tmp_path, torch.device("cpu"))
    layer = dict(m.prepare(model, ctx).named_modules())["model.layers.0.self_attn.q_proj"]
    layer.train()
    saved: list[torch.Tensor] = []

    def keep(t):
        saved.append(t)
        return t

    x = torch.randn(1, layer.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = layer(x)  # alive: every saved tensor is, so no two share an address
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    for kept in (x, *layer.parameters()):  # the input and the latent weight exist anyway
        storages.pop(kept.untyped_storage().data_ptr(), None)
    per_weight = sum(storages.values()) / (layer.in_features * layer.out_features)
    del y
    assert per_weight == pytest.approx(SAVED_BYTES_PER_WEIGHT[m.config.fmt], rel=0.05)


def test_a_share_that_does_not_fit_is_trained_in_pieces_with_the_same_result(tmp_path, cli):
    """Planned whole, the share needs about 2.6 GiB, in pieces of 1 sequence 1.6: with 2 GiB
    the run takes the largest pieces that fit, announces them, keeps its run key, and trains
    what the run without pieces trains."""
    import sqlite3

    args = ["run", "--methods", "qat", "--model", "tiny-llama", "--no-fp", "--tasks", "",
            "--max-eval-tokens", "128", "--seq-len", "128", "--set", "train.steps=1",
            "--set", "train.batch_size=8", "--set", "train.seq_len=256", "--set", "data=corpus",
            "--set", "calib_samples=2", "--set", "calib_seq_len=32", "--set", "clip_tokens=32",
            "--set", "clip_grid=2"]
    losses = []
    for name, extra in (("whole", []), ("pieces", ["--device-mem", "2"])):
        db = tmp_path / f"{name}.db"
        code, out, err = cli(*args, *extra, "--db", f"sqlite:///{db}", "--output-dir",
                             tmp_path / name)
        assert code == 0, err[-2000:]
        con = sqlite3.connect(db)
        [(key, spec)] = con.execute("SELECT run_key, spec FROM runs").fetchall()
        [(loss,)] = con.execute("SELECT loss FROM train_steps").fetchall()
        con.close()
        losses.append((key, json.loads(spec)["config"]["train"].get("micro_batch"), loss, out))
    (key0, pieces0, loss0, out0), (key1, pieces1, loss1, out1) = losses
    assert pieces0 is None and "pieces" not in out0
    assert pieces1 in (4, 3, 2, 1), out1  # real piece sizes of 8 sequences
    assert f"train.micro_batch={pieces1}" in out1 and key1 == key0
    assert loss1 == pytest.approx(loss0, rel=1e-5)
