"""Training settings that follow BitDistiller's reference code: held-out slice, best-step
selection, trainable embeddings; and their validation."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from harness.api import Objective, Recorder
from harness.errors import HarnessError
from harness.train import trainer
from harness.train.config import TrainConfig
from harness.train.data import held_out_count, training_blocks
from harness.train.losses import get_loss

SEQ = 16


class ListRecorder(Recorder):
    def __init__(self):
        self.metrics, self.steps = {}, []

    def metric(self, name, value, task=None, **extra):
        self.metrics[name] = (value, extra)

    def train_step(self, step, loss, lr, tokens_per_s):
        self.steps.append(step)

    def layer_stat(self, *args):
        pass

    def artifact(self, *args):
        pass


def _ctx(tmp_path, data: torch.Tensor, held: torch.Tensor):
    sources = {"corpus": data, "corpus:holdout": held}
    return SimpleNamespace(device=torch.device("cpu"), recorder=ListRecorder(),
                           run_dir=tmp_path, spec=SimpleNamespace(method="qat"),
                           teacher=None, train_batches=lambda source: sources[source])


def _ce() -> Objective:
    ce = get_loss("ce")
    return Objective(loss=lambda inputs: ce(inputs))


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 500, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.trainable_parameters(model)}


@pytest.fixture
def scripted_holdout(monkeypatch):
    """Held-out losses 3, 1, 2 at the evaluations of steps 2, 4, 6 (best: step 4); keeps the
    weights each evaluation saw."""
    seen = {}
    losses = iter([3.0, 1.0, 2.0])

    def fake(model, teacher, objective, held, batch_size, device, amp):
        seen[len(seen) * 2 + 2] = _trainable(model)
        return next(losses)

    monkeypatch.setattr(trainer, "holdout_loss", fake)
    return seen


@pytest.mark.parametrize("select", [True, False])
def test_select_best_restores_the_best_held_out_step_not_the_last(tiny_copy, tmp_path,
                                                                  scripted_holdout, select):
    model, _ = tiny_copy
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=SEQ, lr=1e-2, holdout=0.2, eval_every=2,
                      select_best=select)
    ctx = _ctx(tmp_path, _blocks(8, 0), _blocks(2, 1))
    out = trainer.train(model, _ce(), cfg, ctx, progress=False)
    assert sorted(scripted_holdout) == [2, 4, 6] and out["best_step"] == 4
    final = _trainable(model)
    kept = 4 if select else 6
    for n, t in final.items():
        assert torch.equal(t, scripted_holdout[kept][n]), n
    other = scripted_holdout[6 if select else 4]
    assert any(not torch.equal(t, other[n]) for n, t in final.items())  # steps really differ
    m = ctx.recorder.metrics
    assert m["best_step"][0] == 4 and m["holdout_loss"][0] == 1.0
    assert m["holdout_loss"][1]["curve"] == [[2, 3.0], [4, 1.0], [6, 2.0]]
    assert m["holdout_loss_last"][0] == 2.0 and m["holdout_blocks"][0] == 2
    assert m["holdout_eval_s_total"][0] >= 0
    assert ctx.recorder.steps == [1, 2, 3, 4, 5, 6]  # training steps are logged as before


def test_resumed_selection_keeps_the_best_weights_of_before_the_crash(tiny, tmp_path,
                                                                      monkeypatch):
    """A checkpoint holds the curve and the best step's weights: a run resumed after the best
    step ends where an unbroken one does."""
    losses = {2: 3.0, 4: 1.0, 6: 2.0}
    calls = []

    def fake(model, teacher, objective, held, batch_size, device, amp):
        calls.append(1)
        return losses[{0: 2, 1: 4, 2: 6}[len(calls) - 1]]

    cfg = TrainConfig(steps=6, batch_size=2, seq_len=SEQ, lr=1e-2, holdout=0.2, eval_every=2,
                      select_best=True, checkpoint_every=4)
    monkeypatch.setattr(trainer, "holdout_loss", fake)
    unbroken = copy.deepcopy(tiny[0])
    trainer.train(unbroken, _ce(), cfg, _ctx(tmp_path / "a", _blocks(8, 0), _blocks(2, 1)),
                  progress=False)

    real_step = trainer.optimizer_step

    def crash_at_step_5(model, teacher, objective, opt, params, data, step, *rest):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real_step(model, teacher, objective, opt, params, data, step, *rest)

    calls.clear()
    monkeypatch.setattr(trainer, "optimizer_step", crash_at_step_5)
    broken = copy.deepcopy(tiny[0])
    ctx = _ctx(tmp_path / "b", _blocks(8, 0), _blocks(2, 1))
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train(broken, _ce(), cfg, ctx, progress=False)
    monkeypatch.setattr(trainer, "optimizer_step", real_step)
    resumed = copy.deepcopy(tiny[0])
    ctx = _ctx(tmp_path / "b", _blocks(8, 0), _blocks(2, 1))
    out = trainer.train(resumed, _ce(), cfg, ctx, progress=False)
    assert out["resumed_from"] == 4 and out["best_step"] == 4
    assert len(calls) == 3  # steps 2 and 4 before the crash, only step 6 after it
    assert ctx.recorder.metrics["holdout_loss"][1]["curve"] == [[2, 3.0], [4, 1.0], [6, 2.0]]
    for n, t in _trainable(resumed).items():
        assert torch.equal(t, dict(trainer.trainable_parameters(unbroken))[n]), n


def test_holdout_loss_is_the_objective_per_sequence_over_the_slice(tiny_copy):
    model, _ = tiny_copy
    model.train()
    held = _blocks(3, 2)
    objective = _ce()
    value = trainer.holdout_loss(model, None, objective, held, 2, "cpu", nullcontext())
    with torch.no_grad():
        model.eval()
        each = [float(trainer.batch_loss(model, None, objective, held[i : i + 1],
                                          nullcontext())) for i in range(3)]
    assert value == pytest.approx(sum(each) / 3, rel=1e-5)  # batches [2, 1] weighted by size
    model.train()
    trainer.holdout_loss(model, None, objective, held, 2, "cpu", nullcontext())
    assert model.training  # the mode it had


@pytest.mark.parametrize("trainable", ["non_embedding", "all"])
def test_trainable_all_trains_the_tied_embeddings(tiny_copy, tmp_path, trainable):
    model, _ = tiny_copy
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # tied, as in SmolLM2
    before = emb.detach().clone()
    grads = []
    emb.register_hook(lambda g: grads.append(g.abs().sum().item()))
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=SEQ, lr=1e-2, trainable=trainable)
    ctx = _ctx(tmp_path, _blocks(4, 0), _blocks(1, 1))
    trainer.train(model, _ce(), cfg, ctx, progress=False)
    names = {n for n, _ in trainer.trainable_parameters(model)}
    if trainable == "all":
        assert grads and all(g > 0 for g in grads)
        assert not torch.equal(emb.detach(), before)
        assert "model.embed_tokens.weight" in names
        assert model.get_output_embeddings().weight is emb  # still one tensor
    else:
        assert not grads and torch.equal(emb.detach(), before)
        assert not any("embed" in n or "lm_head" in n for n in names)
    assert any("layers.0.self_attn.q_proj" in n for n in names)


def _spec(**train):
    """``(spec, train settings)``, the first two arguments of ``training_blocks``."""
    from harness.train.config import TrainConfig

    base = dict(steps=5, batch_size=2, seq_len=SEQ, teacher_samples=10, teacher_new_tokens=8)
    return (SimpleNamespace(seed=3, model_key="tiny-llama"),
            TrainConfig(**{**base, **train}))


def test_teacher_holdout_is_whole_samples_never_trained_on(tiny, tmp_path, monkeypatch):
    from harness.train import teacher_data as td

    monkeypatch.setattr(td, "cache_dir", lambda: tmp_path)
    model, tok = tiny
    teacher = lambda: model  # noqa: E731
    plain = training_blocks(*_spec(), tok, "teacher", teacher, "cpu")
    train = training_blocks(*_spec(holdout=0.2), tok, "teacher", teacher, "cpu")
    held = training_blocks(*_spec(holdout=0.2), tok, "teacher:holdout", teacher, "cpu")
    assert training_blocks(*_spec(), tok, "teacher:holdout", teacher, "cpu").numel() == 0
    seqs = td.teacher_sequences("tiny-llama", teacher, tok, 10, 8, seed=0)
    width = seqs.size(1) + 1  # a sample and its EOS
    # holdout 0: the blocks as before the setting existed (stream of all samples, seeded order)
    stream = torch.cat([seqs, torch.full((10, 1), tok.eos_token_id)], 1).reshape(-1)
    old = stream[: stream.numel() // SEQ * SEQ].view(-1, SEQ)
    assert torch.equal(plain, old[torch.randperm(old.size(0),
                                                 generator=torch.Generator().manual_seed(3))])
    # 0.2 of 10 samples: the first 2, whole; the training part is the other 8 only
    assert torch.equal(held.reshape(-1), stream[: held.numel()]) and held.numel() <= 2 * width
    train_tokens = stream[2 * width :]
    assert sorted(train.reshape(-1).tolist()) == sorted(
        train_tokens[: train_tokens.numel() // SEQ * SEQ].tolist())


def test_corpus_holdout_adds_unread_blocks_and_keeps_the_training_ones(tiny):
    _, tok = tiny
    plain = training_blocks(*_spec(), tok, "corpus", None, "cpu")
    train = training_blocks(*_spec(holdout=0.3), tok, "corpus", None, "cpu")
    held = training_blocks(*_spec(holdout=0.3), tok, "corpus:holdout", None, "cpu")
    assert torch.equal(plain, train) and plain.size(0) == 10  # 5 steps x 2
    assert held.size(0) == 3
    rows = {tuple(r) for r in train.tolist()}
    assert not any(tuple(r) in rows for r in held.tolist())


@pytest.mark.parametrize("n,fraction,k", [(64, 0.2, 12), (10, 0.2, 2), (4, 0.2, 1), (100, 0.29, 29),
                                          (8, 0.0, 0)])
def test_held_out_count(n, fraction, k):
    assert held_out_count(n, fraction) == k


def test_eval_every_default_is_ten_evaluations_per_run():
    assert TrainConfig(steps=40).holdout_every == 4  # the reference's --eval_steps 4
    assert TrainConfig(steps=1500).holdout_every == 150
    assert TrainConfig(steps=6).holdout_every == 1
    assert TrainConfig(steps=40, eval_every=7).holdout_every == 7


@pytest.mark.parametrize("train,needle", [
    ({"select_best": True, "holdout": 0.0}, "train.select_best needs a held-out slice"),
    ({"holdout": 1.0}, "holdout"),
    ({"holdout": -0.1}, "holdout"),
    ({"eval_every": 0}, "eval_every"),
    ({"trainable": "embeddings"}, "trainable"),
    ({"teacher_top_k": -1}, "teacher_top_k"),
    ({"teacher_top_p": 0}, "teacher_top_p"),
])
def test_bad_selection_settings_are_one_line_errors(train, needle):
    from harness.orchestration.plan import build_spec

    with pytest.raises(HarnessError, match=needle) as info:
        build_spec("tiny-llama", "bitdistiller", {"bits": 3, "train": train}, "quick")
    assert "\n" not in str(info.value)


def test_unknown_source_and_a_holdout_of_everything_are_errors(tiny, tmp_path, monkeypatch):
    from harness.train import teacher_data as td

    monkeypatch.setattr(td, "cache_dir", lambda: tmp_path)
    model, tok = tiny
    with pytest.raises(HarnessError, match="unknown training data source"):
        training_blocks(*_spec(), tok, "teacher:eval", lambda: model, "cpu")
    with pytest.raises(HarnessError, match="holds out all 1 teacher samples"):
        training_blocks(*_spec(teacher_samples=1, holdout=0.5), tok, "teacher", lambda: model,
                        "cpu")
