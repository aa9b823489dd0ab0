"""Training token blocks for a run: corpus blocks or teacher-generated sequences."""

from __future__ import annotations

import torch

from harness.errors import HarnessError


def training_blocks(spec, tokenizer, source: str, teacher, device) -> torch.Tensor:
    """``[n, seq_len]`` training blocks for ``spec``'s method config.

    Args:
        source: ``"corpus"`` (training plays) or ``"teacher"`` (FP-model continuations).
        teacher: callable returning the frozen teacher (loaded only when data must be generated).
    """
    from harness import data

    train = spec.config.get("train", {})
    seq_len = int(train.get("seq_len", 256))
    needed = int(train.get("steps", 1)) * int(train.get("batch_size", 1)) * int(train.get("grad_accum", 1))
    if source == "corpus":
        return data.token_blocks(tokenizer, "train", seq_len, max(needed, 1), seed=spec.seed)
    if source == "teacher":
        from harness.train.teacher_data import teacher_sequences

        seqs = teacher_sequences(spec.model_key, teacher, tokenizer,
                                 int(train.get("teacher_samples", 64)),
                                 int(train.get("teacher_new_tokens", 256)),
                                 float(train.get("temperature", 0.7)), seed=0)
        # Concatenate samples (EOS between) into one stream and cut fixed blocks: no padding,
        # every position is a real teacher token.
        eos = torch.full((seqs.size(0), 1), tokenizer.eos_token_id, dtype=seqs.dtype)
        stream = torch.cat([seqs, eos], dim=1).reshape(-1)
        n = stream.numel() // seq_len
        if n == 0:
            raise HarnessError("teacher data is shorter than one training sequence; raise "
                               "train.teacher_samples or train.teacher_new_tokens")
        blocks = stream[: n * seq_len].view(n, seq_len)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
        return blocks[order]
    raise HarnessError(f"unknown training data source {source!r}; use corpus or teacher")
