"""Training token blocks for a run: corpus blocks or teacher-generated sequences.

A source is ``"corpus"`` or ``"teacher"``, optionally suffixed ``":holdout"``: the held-out
slice (``train.holdout``) that checkpoint selection scores, which the plain source then leaves
out. Both come from one split, so no token is in both.
"""

from __future__ import annotations

import torch

from harness import data
from harness.errors import HarnessError
from harness.train.config import TrainConfig
from harness.train.teacher_data import Sampler, teacher_sequences

SOURCES = ("corpus", "teacher")
HOLDOUT = "holdout"


def holdout_source(source: str) -> str:
    """The name under which ``source``'s held-out slice is asked for (``ctx.train_batches``)."""
    return f"{source}:{HOLDOUT}"


def held_out_count(n: int, fraction: float) -> int:
    """Items held out of ``n``: ``floor(n * fraction)``, as the reference's ``len // 5`` for
    0.2, but at least one when ``fraction`` > 0."""
    if fraction <= 0:
        return 0
    return max(1, int(n * fraction + 1e-9))  # 1e-9: 0.29 * 100 is 28.999...


def training_blocks(spec, train: TrainConfig, tokenizer, source: str, teacher,
                    device, sampler: Sampler | None = None) -> torch.Tensor:
    """``[n, seq_len]`` training blocks for ``spec``'s run.

    Args:
        train: the run's training settings (its method config's ``train``): budget, sequence
            length, teacher sampling, held-out fraction.
        source: ``"corpus"`` (training plays) or ``"teacher"`` (FP-model continuations), with
            ``":holdout"`` for the held-out slice instead of the training part.
        teacher: callable returning the frozen teacher (loaded only when data must be generated).
        sampler: how missing teacher data is sampled (default: on ``teacher()``), e.g. on the
            run's training workers (:mod:`harness.train.worker_generation`).

    Raises:
        HarnessError: an unknown source, or too little data for the held-out split.
    """
    kind, _, part = source.partition(":")
    if kind not in SOURCES or part not in ("", HOLDOUT):
        raise HarnessError(f"unknown training data source {source!r}; use corpus or teacher")
    split = _corpus_split if kind == "corpus" else _teacher_split
    blocks, held = split(spec, tokenizer, teacher, train, sampler)
    return held if part else blocks


def _corpus_split(spec, tokenizer, _teacher, cfg, _sampler) -> tuple[torch.Tensor, torch.Tensor]:
    needed = max(1, cfg.steps * cfg.batch_size * cfg.grad_accum)
    blocks = data.token_blocks(tokenizer, "train", cfg.seq_len, None, seed=spec.seed)
    # The corpus has far more blocks than a run reads: the held-out ones are blocks the run
    # would not have read, so holding out leaves the training blocks as they were.
    k = held_out_count(min(needed, blocks.size(0)), cfg.holdout)
    if k and blocks.size(0) < 2:
        raise HarnessError(f"the training plays hold {blocks.size(0)} block(s) of "
                           f"{cfg.seq_len} tokens, too few to hold one out; lower train.seq_len "
                           f"or set train.holdout=0")
    n_train = min(needed, blocks.size(0) - k)
    return blocks[:n_train], blocks[n_train : n_train + k]


def _teacher_split(spec, tokenizer, teacher, cfg, sampler) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = teacher_sequences(spec.model_key, teacher, tokenizer, cfg.teacher_samples,
                             cfg.teacher_new_tokens, cfg.temperature, seed=0,
                             top_k=cfg.teacher_top_k, top_p=cfg.teacher_top_p, sampler=sampler)
    # Whole samples are held out (the reference holds out its first fifth): a block cut across
    # two samples would otherwise put the two halves of one continuation on both sides.
    k = held_out_count(seqs.size(0), cfg.holdout)
    if k >= seqs.size(0):
        raise HarnessError(f"train.holdout={cfg.holdout} holds out all {seqs.size(0)} teacher "
                           f"samples; lower train.holdout or raise train.teacher_samples")
    eos = tokenizer.eos_token_id
    train = _blocks(seqs[k:], eos, cfg.seq_len)
    order = torch.randperm(train.size(0), generator=torch.Generator().manual_seed(spec.seed))
    held = _blocks(seqs[:k], eos, cfg.seq_len) if k else train[:0]
    return train[order], held


def _blocks(seqs: torch.Tensor, eos: int, seq_len: int) -> torch.Tensor:
    """Samples concatenated (EOS between) into one stream, cut into fixed blocks: no padding,
    every position is a real teacher token."""
    sep = torch.full((seqs.size(0), 1), eos, dtype=seqs.dtype)
    stream = torch.cat([seqs, sep], dim=1).reshape(-1)
    n = stream.numel() // seq_len
    if n == 0:
        raise HarnessError(f"{seqs.size(0)} teacher sample(s) are shorter than one training "
                           f"sequence ({seq_len} tokens); raise train.teacher_samples or "
                           f"train.teacher_new_tokens (or lower train.holdout)")
    return stream[: n * seq_len].view(n, seq_len)
