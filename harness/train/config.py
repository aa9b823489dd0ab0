"""Training settings shared by every method that trains (qat, bitdistiller, onebit)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: tokens in one micro-batch above which no accelerator holds the logits (16M tokens x a 32k
#: vocabulary in fp32 is 2 TB): a typo, rejected before any work. Use grad_accum for more.
MAX_MICRO_BATCH_TOKENS = 1 << 24


class TrainConfig(BaseModel):
    """Optimiser, schedule and budget. Defaults for the budget come from the profile.

    BitDistiller (LLaMA-2-7B): AdamW, lr 8e-6 constant, wd 0, grad clip 1.0, bf16.
    OneBit: Adam(0.9, 0.98), wd 0.01, cosine with warm-up, lr 4e-4 for small models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(40, ge=1, description="optimizer steps")
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
    teacher_samples: int = Field(64, ge=1, description="teacher-generated sequences")
    teacher_new_tokens: int = Field(256, ge=1, description="tokens generated per sequence")
    temperature: float = Field(0.7, gt=0, description="teacher sampling temperature")

    @model_validator(mode="after")
    def _micro_batch_fits_somewhere(self):
        tokens = self.batch_size * self.seq_len
        if tokens > MAX_MICRO_BATCH_TOKENS:
            raise ValueError(
                f"batch_size x seq_len = {tokens:,} tokens per micro-batch is more than any "
                f"device holds (max {MAX_MICRO_BATCH_TOKENS:,}); lower train.batch_size and "
                f"raise train.grad_accum instead")
        return self
