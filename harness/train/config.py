"""Training settings shared by every method that trains (qat, bitdistiller, onebit)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: tokens in one micro-batch above which no accelerator holds the logits (16M tokens x a 32k
#: vocabulary in fp32 is 2 TB): a typo, rejected before any work. Use grad_accum for more.
MAX_MICRO_BATCH_TOKENS = 1 << 24


def share_pieces(share: int, micro_batch: int | None) -> int:
    """Pieces a share of ``share`` sequences is taken in under ``train.micro_batch``."""
    return 1 if not micro_batch else -(-share // micro_batch)


class TrainConfig(BaseModel):
    """Optimiser, schedule, budget, teacher sampling and checkpoint selection. Defaults for the
    budget come from the profile.

    BitDistiller (LLaMA-2-7B): AdamW, lr 8e-6 constant, wd 0, grad clip 1.0, bf16.
    OneBit: Adam(0.9, 0.98), wd 0.01, cosine with warm-up, lr 4e-4 for small models.
    Where the harness differs from the reference code: docs/IMPLEMENTATION.md, "Deviations from
    the reference code".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(20, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    seq_len: int = Field(256, ge=8, description="tokens per sequence")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(8e-6, gt=0, description="peak learning rate")
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled decay; biases and "
                                "norm weights are exempt, as in Hugging Face's Trainer")
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    log_every: int = Field(1, ge=1, description="write train_steps every N steps")
    checkpoint_every: int = Field(20, ge=1, description="checkpoint every N steps (and at the end)")
    grad_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward instead "
        "of keeping them (long sequences, big models); same result, not part of the run key")
    micro_batch: int | None = Field(
        None, ge=1, description="most sequences one forward/backward takes (on each worker): "
        "a larger share of a micro-batch is taken in pieces and their gradients accumulated, "
        "each piece weighted by its sequences; same result up to summation order, less "
        "activation memory, not part of the run key. Unset: the whole share at once")
    teacher_shard: bool | None = Field(
        None, description="on N training workers, shard the frozen teacher with FSDP2 (each "
        "worker holds 1/N, every layer gathered around its forward) instead of a whole copy per "
        "worker; the same teacher outputs, not part of the run key. Unset: the memory plan "
        "shards it only when a whole copy per worker does not fit the device")
    teacher_samples: int = Field(64, ge=1, description="teacher-generated sequences")
    teacher_new_tokens: int = Field(256, ge=1, description="tokens generated per sequence")
    temperature: float = Field(0.7, gt=0, description="teacher sampling temperature")
    teacher_top_k: int = Field(
        50, ge=0, description="teacher sampling keeps the k most likely tokens (0 = all). 50: "
        "the reference's Hugging Face path (GenerationConfig's default); its vLLM path keeps all")
    teacher_top_p: float = Field(1.0, gt=0, le=1, description="teacher nucleus sampling mass "
                                 "(1 = off, as in the reference)")
    trainable: Literal["non_embedding", "all"] = Field(
        "non_embedding", description="non_embedding: every parameter but the input embeddings "
        "and lm_head; all: those too (BitDistiller's reference). Packed files do not store "
        "embeddings, so only the run's own evaluation sees trained ones")
    holdout: float = Field(0.0, ge=0, lt=1, description="fraction of the training data kept "
                           "out of training (whole teacher samples; for corpus data as many "
                           "extra corpus blocks) to compute a held-out loss on; never eval data")
    eval_every: int | None = Field(
        None, ge=1, description="held-out loss every N steps and after the last; unset: "
        "steps // 10 (at least 1), i.e. 10 evaluations per run")
    select_best: bool = Field(False, description="end with the weights of the step with the "
                              "lowest held-out loss instead of the last (needs holdout > 0)")

    @model_validator(mode="after")
    def _selection_needs_holdout(self):
        if self.select_best and not self.holdout:
            raise ValueError("train.select_best needs a held-out slice: set train.holdout "
                             "(e.g. 0.2, the reference's fifth) or train.select_best=false")
        return self

    @property
    def holdout_every(self) -> int:
        """Steps between held-out evaluations (:attr:`eval_every` resolved)."""
        return self.eval_every or max(1, self.steps // 10)

    @model_validator(mode="after")
    def _micro_batch_fits_somewhere(self):
        tokens = self.batch_size * self.seq_len
        if tokens > MAX_MICRO_BATCH_TOKENS:
            raise ValueError(
                f"batch_size x seq_len = {tokens:,} tokens per micro-batch is more than any "
                f"device holds (max {MAX_MICRO_BATCH_TOKENS:,}); lower train.batch_size and "
                f"raise train.grad_accum instead")
        return self
