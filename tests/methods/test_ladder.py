"""The ladder on tiny-llama through the real runner and store (integration tier)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.orchestration.plan import build_spec
from harness.orchestration.scheduler import execute

IN = {64, 192}
TRAIN = {"steps": 6, "seq_len": 64, "batch_size": 2, "checkpoint_every": 2,
         "teacher_samples": 8, "teacher_new_tokens": 32}
EVAL = {"max_tokens": 1024, "seq_len": 256, "tasks": ()}  # accuracy: tests/eval


def _spec(method, **over):
    over.setdefault("bits", 3)
    if method in ("qat", "bitdistiller", "onebit"):
        over.setdefault("train", dict(TRAIN))
    if method == "onebit":
        over.pop("bits")
    return build_spec("tiny-llama", method, over, "quick", 0, EVAL, IN)


def test_clip_lowers_output_error_and_records_layer_stats(store, tmp_path):
    [out] = execute([_spec("clip")], store, tmp_path)
    assert out.status == "finished", out.error
    stats = store.layer_stats(out.run_id)
    before = {(s.layer, s.module): s.value for s in stats if s.stat == "rtn_output_mse"}
    after = {(s.layer, s.module): s.value for s in stats if s.stat == "clip_output_mse"}
    # 2 layers x 5 linears: q_proj and k_proj stay at RTN, as in the reference's autoclip.py
    assert len(before) == 10 and not any(m in ("q_proj", "k_proj") for _, m in before)
    assert all(after[k] <= before[k] + 1e-12 for k in before)
    assert sum(after.values()) < sum(before.values())


def test_bitdistiller_trains_on_teacher_data_and_stores_gamma(store, tmp_path):
    train = {**TRAIN, "holdout": 0.2, "select_best": True}  # the reference's selection, opted in
    [out] = execute([_spec("bitdistiller", train=train)], store, tmp_path)
    assert out.status == "finished", out.error
    m = store.metric_dict(out.run_id)
    assert 0 < m["cakld_gamma"] < 1
    # memory per stage; a GPU peak only where there is a GPU (not "0 MB" on a CPU)
    stages = ("load", "prepare", "objective", "train", "finalize", "eval")
    assert all(m[f"peak_rss_mb_{s}"] > 0 for s in stages) and m["peak_rss_mb"] > 0
    assert ("peak_gpu_mb" in m) == torch.cuda.is_available()
    assert all((f"peak_gpu_mb_{s}" in m) == torch.cuda.is_available() for s in stages)
    assert m["bits_per_weight"] > 0 and m["total_bytes"] == m["quantized_bytes"] + m["fp_bytes"]
    assert [s.step for s in store.train_steps(out.run_id)] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / out.spec.run_key / "packed.safetensors").exists()
    # the reference's selection: a fifth of the teacher samples held out, scored every step
    # here (6 steps // 10 -> 1), the best step's weights kept; the reference's lr by default
    assert out.spec.config["train"]["select_best"] and out.spec.config["train"]["lr"] == 8e-6
    assert 1 <= m["best_step"] <= 6 and m["holdout_loss"] > 0 and m["holdout_blocks"] >= 1
    assert m["holdout_loss"] <= m["holdout_loss_last"]


def test_crash_mid_training_then_rerun_resumes(store, tmp_path, monkeypatch):
    import harness.train.trainer as trainer

    real = trainer.batch_at

    def crash_at_step_3(data, step, micro, cfg):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real(data, step, micro, cfg)

    spec = _spec("qat")
    monkeypatch.setattr(trainer, "batch_at", crash_at_step_3)
    [first] = execute([spec], store, tmp_path)
    assert first.status == "failed" and "simulated crash" in first.error
    assert store.get_run(first.run_id).status == "failed"
    monkeypatch.setattr(trainer, "batch_at", real)
    [second] = execute([spec], store, tmp_path)
    assert second.status == "finished" and second.run_id == first.run_id
    m = store.metric_dict(second.run_id)
    assert m["resumed_from_step"] == 2  # last checkpoint before the crash
    steps = [s.step for s in store.train_steps(second.run_id)]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing duplicated
    [third] = execute([spec], store, tmp_path)
    assert third.status == "skipped"
    # checkpointing more or less often computes the same run: reused, not rerun
    [fourth] = execute([_spec("qat", train={**TRAIN, "checkpoint_every": 3})], store, tmp_path)
    assert fourth.status == "skipped" and fourth.run_id == first.run_id


@pytest.mark.parametrize("bad", [3, 4])
def test_nan_found_a_step_late_never_reaches_a_checkpoint(store, tmp_path, monkeypatch, bad):
    """The host reads step n's loss after dispatching step n+1. A NaN at step 3 is read while
    step 4 (a checkpoint step) runs; one at step 4 must be read before step 4 is saved.
    Either way the run fails on the right step and the checkpoint stays at step 2."""
    import torch

    import methods.qat as qat

    real = qat.make_objective

    def nan_at_step_3(config, ctx, gamma=None):
        obj = real(config, ctx, gamma)
        loss, calls = obj.loss, []

        def spoiled(inputs):
            if not torch.is_grad_enabled():  # the held-out evaluation between steps
                return loss(inputs)
            calls.append(1)
            out = loss(inputs)
            return out * torch.tensor(float("nan")) if len(calls) == bad else out
        obj.loss = spoiled
        return obj

    monkeypatch.setattr(qat, "make_objective", nan_at_step_3)
    spec = _spec("qat")
    [out] = execute([spec], store, tmp_path)
    assert out.status == "failed" and f"loss is nan at step {bad}" in out.error
    state = json.loads((tmp_path / spec.run_key / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert [s.step for s in store.train_steps(out.run_id)] == list(range(1, bad))


def test_dispatching_a_step_never_waits_for_its_loss(store, tmp_path, monkeypatch):
    """No host read of a tensor inside the step (each would stall the host on a GPU); the
    losses read one step later are the ones logged, all six of them."""
    import sys

    import torch

    import harness.train.trainer as trainer

    real_step, inside = trainer.optimizer_step, []

    def watched(*args, **kwargs):
        inside.append(True)
        try:
            return real_step(*args, **kwargs)
        finally:
            inside.pop()

    real_item = torch.Tensor.item

    def item(t):
        # AdamW reads its step counters, which live on the host on every device
        caller = sys._getframe(1).f_globals.get("__name__", "")
        assert not inside or caller.startswith("torch.optim"), \
            f"a training step read a tensor on the host ({caller})"
        return real_item(t)

    monkeypatch.setattr(trainer, "optimizer_step", watched)
    monkeypatch.setattr(torch.Tensor, "item", item)
    [out] = execute([_spec("qat")], store, tmp_path)
    assert out.status == "finished", out.error
    rows = store.train_steps(out.run_id)
    assert [s.step for s in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r.loss > 0 for r in rows)
    assert store.metric_dict(out.run_id)["final_train_loss"] == rows[-1].loss


def test_sigterm_checkpoints_the_current_step_and_the_resumed_run_equals_an_unbroken_one(
        store, tmp_path, monkeypatch):
    import os
    import signal

    import harness.train.trainer as trainer
    from harness import interrupts
    from harness.store import Store

    real = trainer.batch_at

    def sigterm_during_step_3(data, step, micro, cfg):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(data, step, micro, cfg)

    spec = _spec("qat", train={**TRAIN, "checkpoint_every": 100})  # no periodic checkpoint
    monkeypatch.setattr(trainer, "batch_at", sigterm_during_step_3)
    with pytest.raises(interrupts.Interrupted) as info, interrupts.installed():
        execute([spec], store, tmp_path / "a")
    assert "stopped by SIGTERM after training step 3 of 6" in str(info.value)
    [run] = store.runs()
    assert run.status == "failed" and "after training step 3 of 6" in run.error
    state = json.loads((tmp_path / "a" / spec.run_key / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["train_s"] > 0  # the step in flight was kept
    monkeypatch.setattr(trainer, "batch_at", real)
    [resumed] = execute([spec], store, tmp_path / "a")
    assert resumed.status == "finished" and resumed.run_id == run.id
    m = store.metric_dict(resumed.run_id)
    assert m["resumed_from_step"] == 3
    assert [s.step for s in store.train_steps(run.id)] == [1, 2, 3, 4, 5, 6]
    assert m["train_steps_s_total"] > state["train_s"]  # seconds of both invocations

    other = Store(f"sqlite:///{tmp_path / 'unbroken.db'}")
    [unbroken] = execute([spec], other, tmp_path / "b")
    u = other.metric_dict(unbroken.run_id)
    assert m["ppl"] == u["ppl"] and m["final_train_loss"] == u["final_train_loss"]
    assert [s.loss for s in store.train_steps(run.id)] == \
        [s.loss for s in other.train_steps(unbroken.run_id)]


def test_nan_loss_fails_the_run_with_a_clear_message(store, tmp_path, nan_loss):
    [out] = execute([_spec("qat")], store, tmp_path)
    assert out.status == "failed"
    assert "loss is nan" in out.error and "learning rate" in out.error


def test_corrupt_checkpoint_is_a_clear_error(store, tmp_path):
    spec = _spec("qat")
    ckpt = tmp_path / spec.run_key / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{not json")
    [out] = execute([spec], store, tmp_path)
    assert out.status == "failed" and "delete that folder" in out.error


def test_onebit_stores_svid_vs_svd_and_one_bit_storage(store, tmp_path):
    [out] = execute([_spec("onebit")], store, tmp_path)
    assert out.status == "finished", out.error
    m = store.metric_dict(out.run_id)
    assert 1.0 < m["bits_per_weight"] < 1.6  # tiny 64-wide layers: value vectors weigh more
    stats = store.layer_stats(out.run_id)
    svid = {(s.layer, s.module): s.value for s in stats if s.stat == "svid_error"}
    svd = {(s.layer, s.module): s.value for s in stats if s.stat == "svd_rank1_error"}
    assert len(svid) == 14 and svid.keys() == svd.keys()  # 2 layers x 7 linears, paired
    # OneBit's proposition: sign(W) kept exactly, a rank-1 |W| loses less than rank-1 W.
    worse = {k: (svid[k], svd[k]) for k in svid if not svid[k] < svd[k]}
    assert not worse, worse


def test_export_and_eval_cli(cli, db_url, tmp_path):
    from transformers import AutoModelForCausalLM

    code, _, err = cli("run", "--methods", "rtn", "--bits", "3", "--model", "tiny-llama",
                       "--max-eval-tokens", "1024", "--seq-len", "256", "--db", db_url,
                       "--output-dir", tmp_path / "runs")
    assert code == 0, err
    _, out, _ = cli("list", "--json", "--db", db_url)
    rtn = next(r for r in json.loads(out) if r["method"] == "rtn")
    code, out, err = cli("export", rtn["run_key"], tmp_path / "hf", "--db", db_url)
    assert code == 0, err
    listed = {Path(p).name for p in out.split()}  # every file written, weights included
    assert {"packed.safetensors", "config.json", "model.safetensors"} <= listed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 2
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 60)
    code, out, err = cli("eval", rtn["run_key"], "--text", text, "--seq-len", "128",
                         "--db", db_url)
    assert code == 0, err
    assert out.startswith("ppl=") and "tokens=" in out
    code, _, err = cli("eval", rtn["run_key"], "--text", tmp_path / "missing.txt", "--db", db_url)
    assert code == 2 and "does not exist" in err
    # Without flags eval uses the run's own window and token cap: it reproduces the stored PPL,
    # from the run, from the dense export and from the packed export alike (no database).
    stored = f"ppl={rtn['metrics']['ppl']:.4f} tokens=1024"
    code, _, err = cli("export", rtn["run_key"], tmp_path / "packed", "--packed", "--db", db_url)
    assert code == 0, err
    for target in (rtn["run_key"], tmp_path / "packed", tmp_path / "packed" / "packed.safetensors"):
        code, out, err = cli("eval", target, "--db", db_url)
        assert code == 0, err
        assert out.splitlines()[0] == stored, target
    code, out, err = cli("eval", tmp_path / "hf", "--max-tokens", "1024", "--seq-len", "256")
    assert code == 0, err
    assert float(out.split()[0].removeprefix("ppl=")) == pytest.approx(rtn["metrics"]["ppl"],
                                                                       rel=1e-3)
    code, _, err = cli("eval", tmp_path, "--db", db_url)  # neither a packed file nor HF config
    assert code == 2 and "neither" in err and "Traceback" not in err
    code, _, err = cli("eval", rtn["run_key"], "--seq-len", "0", "--db", db_url)
    assert code == 2 and "--seq-len 0" in err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = cli("export", rtn["run_key"], a_file, "--db", db_url)
    assert code == 2 and "is a file" in err and "Traceback" not in err


def test_eval_refuses_a_packed_file_of_another_model(cli, db_url, tmp_path):
    """A run's packed file replaced by one quantized from another base model: eval says so
    instead of scoring the wrong model."""
    from harness.models import load_model

    other, tok = load_model("tiny-llama")
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(2)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    keys = {}
    for model in ("tiny-llama", tmp_path / "other"):
        code, _, err = cli("run", "--methods", "rtn", "--bits", "3", "--model", model, "--no-fp",
                           "--tasks", "", "--max-eval-tokens", "256", "--seq-len", "128",
                           "--db", db_url, "--output-dir", tmp_path / "runs")
        assert code == 0, err
        _, out, _ = cli("list", "--json", "--db", db_url)
        keys[str(model)] = next(r["run_key"] for r in json.loads(out) if r["run_key"] not in
                                keys.values())
    mine, theirs = (tmp_path / "runs" / keys[k] / "packed.safetensors" for k in keys)
    shutil.copyfile(theirs, mine)
    code, _, err = cli("eval", keys["tiny-llama"], "--db", db_url)
    assert code == 2 and "was made from model" in err and "Traceback" not in err


def test_onebit_run_evaluates_and_exports_packed_through_the_cli(cli, db_url, tmp_path):
    """OneBitLinear has no dense HF form: eval goes through the packed file, export needs
    --packed, and the exported file alone rebuilds the model eval measured."""
    from harness import data
    from harness.eval.ppl import perplexity
    from harness.export import load_packed

    code, _, err = cli("run", "--methods", "onebit", "--model", "tiny-llama", "--no-fp",
                       "--tasks", "", "--set", "train.steps=2", "--set", "train.seq_len=32",
                       "--set", "train.teacher_samples=4", "--set", "train.teacher_new_tokens=32",
                       "--max-eval-tokens", "512",
                       "--seq-len", "128", "--db", db_url, "--output-dir", tmp_path / "runs")
    assert code == 0, err
    _, out, _ = cli("list", "--json", "--db", db_url)
    run = next(r for r in json.loads(out) if r["method"] == "onebit")
    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 40)
    code, out, err = cli("eval", run["run_key"], "--text", text, "--seq-len", "128",
                         "--db", db_url)
    assert code == 0, err
    ppl = float(out.split()[0].removeprefix("ppl="))
    # the packed file reproduces the trained model: same held-out PPL as the run stored
    code, out, err = cli("eval", run["run_key"], "--seq-len", "128", "--max-tokens", "512",
                         "--db", db_url)
    assert code == 0, err
    assert float(out.split()[0].removeprefix("ppl=")) == pytest.approx(run["metrics"]["ppl"], rel=1e-3)
    code, _, err = cli("export", run["run_key"], tmp_path / "hf", "--db", db_url)
    assert code == 2 and "--packed" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()  # refused before writing anything
    code, _, err = cli("export", run["run_key"], tmp_path / "packed", "--packed", "--db", db_url)
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "packed", "--seq-len", "128", "--max-tokens", "512")
    assert code == 0, err
    assert float(out.split()[0].removeprefix("ppl=")) == pytest.approx(run["metrics"]["ppl"], rel=1e-3)
    model, tok, _ = load_packed(tmp_path / "packed" / "packed.safetensors")
    assert any(type(m).__name__ == "OneBitLinear" for m in model.modules())
    again = perplexity(model, data.tokenize(tok, text.read_text()), seq_len=128)
    assert again.ppl == pytest.approx(ppl, rel=1e-3)  # eval prints 4 decimals


@pytest.mark.parametrize("over,needle", [
    ({"loss": "klx"}, "unknown loss"),
    ({"gamma": "papr"}, "gamma"),
    ({"gamma": 1.5}, "gamma"),
    ({"train": {"lr": -1}}, "lr"),
    ({"train": {"steps": 0}}, "steps"),
])
def test_bad_training_config(over, needle):
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=needle):
        from harness.registry import build_method

        spec = _spec("bitdistiller", **over)
        build_method(spec)
        from harness.train.losses import get_loss

        get_loss(spec.config["loss"])


def test_gamma_is_estimated_on_the_runs_own_training_data():
    """METHODS.md: the mean teacher probability of the training data's tokens, so a run on the
    corpus estimates it on the corpus (it used to always take teacher-generated data)."""
    from methods.bitdistiller import estimate_gamma

    asked = []

    class Ctx:
        device = torch.device("cpu")

        def train_batches(self, kind):
            asked.append(kind)
            return torch.randint(0, 50, (8, 16))

        def teacher(self):
            def model(ids, **_):
                class Out:
                    logits = torch.zeros(ids.size(0), ids.size(1), 50)
                return Out()
            model.config = None
            return model

    gamma = estimate_gamma("paper", Ctx(), 4, "corpus")
    assert asked == ["corpus"] and gamma == pytest.approx(1 / 50)  # uniform teacher


def test_selection_is_offered_but_off_by_default():
    """Measured on the quick profile: the held-out loss fell at every evaluation, so the last
    step won, at a third of the training time (docs/IMPLEMENTATION.md, deviations row 3)."""
    for method in ("qat", "bitdistiller"):
        train = _spec(method).config["train"]
        assert (train["holdout"], train["select_best"], train["lr"]) == (0.0, False, 8e-6)
