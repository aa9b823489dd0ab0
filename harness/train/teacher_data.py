"""Teacher-generated training data (BitDistiller, OneBit): the FP model continues prompts.

Prompts are short random spans of the training plays (the paper uses the first 128 characters
of wikitext-2 train documents plus alpaca instructions). Continuations are sampled as the
reference's Hugging Face path samples them (temperature 0.7, top-k 50, top-p 1), batched (each
batch from its own seed, so a run's training workers can split the batches and sample what one
process would), with a progress bar, and cached on disk keyed by the model, the prompts and the
sampling parameters, so a sweep generates them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from harness import data
from harness.config import default_profile, get_profile
from harness.devices import pick_device
from harness.errors import HarnessError
from harness.models import load_model
from harness.paths import cache_dir, replaced
from harness.train.config import TrainConfig

log = logging.getLogger(__name__)

PROMPT_TOKENS = 32


def make_prompts(tokenizer, n: int, seed: int, prompt_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """``[n, prompt_tokens]`` prompts cut at random line starts of the training plays."""
    ids = data.split_ids(tokenizer, "train")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - prompt_tokens - 1, (n * 4,), generator=gen)
    if len(newline) == 1:
        # Prefer spans starting right after a newline: prompts then begin at a speech or line.
        after_nl = [int(s) for s in starts if ids[s] == newline[0]]
        picked = (after_nl + [int(s) for s in starts])[:n]
    else:
        picked = [int(s) for s in starts[:n]]
    return torch.stack([ids[s + 1 : s + 1 + prompt_tokens] for s in picked])


def sampling_defaults() -> dict[str, float]:
    """``{temperature, top_k, top_p}`` a run samples with unless its train settings say else."""
    fields = TrainConfig.model_fields
    return {"temperature": fields["temperature"].default,
            "top_k": fields["teacher_top_k"].default, "top_p": fields["teacher_top_p"].default}


#: Prompts sampled per ``generate`` call, each batch from its own seed (:func:`batch_seed`).
#: The batch size is part of what a cache file holds (a batch's rows share one random stream);
#: 64 samples 1.75x the tokens/s of 16 on the 2-core CPU (SmolLM2, 32 new tokens: 177 vs 101
#: tokens/s) and fills a GPU better.
GENERATE_BATCH = 64
#: How the random streams are laid out, in every cache key: files written when one stream ran
#: through all batches in order (before any batch could be sampled on its own) do not match.
SEEDING = "per-batch"


def batch_seed(seed: int, index: int) -> int:
    """The seed batch ``index`` is sampled from: any process can sample any batch (training
    workers split them) and draw what one process drawing them all would."""
    return seed * 1_000_003 + index


def cache_key(model_name: str, prompts: torch.Tensor, new_tokens: int, temperature: float,
              seed: int, top_k: int, top_p: float, batch_size: int = GENERATE_BATCH) -> str:
    fields = {"model": model_name, "new_tokens": new_tokens, "temperature": temperature,
              "seed": seed, "top_k": top_k, "top_p": float(top_p), "batch": batch_size,
              "seeding": SEEDING}
    h = hashlib.sha256()
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(prompts.numpy().tobytes())
    return h.hexdigest()[:20]


def _cache_path(key: str) -> Path:
    return cache_dir() / "teacher" / f"{key}.safetensors"


def batch_count(prompts: torch.Tensor, batch_size: int = GENERATE_BATCH) -> int:
    """How many ``generate`` batches ``prompts`` make."""
    return -(-prompts.size(0) // batch_size)


@torch.no_grad()
def generate(model, tokenizer, prompts: torch.Tensor, new_tokens: int, temperature: float,
             seed: int, top_k: int, top_p: float, batch_size: int = GENERATE_BATCH,
             progress: bool = True, batches: Sequence[int] | None = None) -> torch.Tensor:
    """Samples continuations; returns ``[n, prompt + new_tokens]``: those of ``batches`` (the
    indices of batches of ``batch_size`` prompts; all by default), in that order.

    Each batch is sampled from its own seed (:func:`batch_seed`), so a batch's rows do not
    depend on which other batches this call samples. End-of-sequence is suppressed until
    ``new_tokens`` (``min_new_tokens``): training takes fixed-length blocks, so a sample goes on
    where the teacher would have stopped instead of being padded (the reference generates up to
    1024 tokens and stops at EOS). ``top_k`` and ``top_p`` are passed explicitly (0 = no
    top-k): a model's own generation_config would otherwise fill in whatever its authors chose.
    """
    device = next(model.parameters()).device
    chosen = range(batch_count(prompts, batch_size)) if batches is None else batches
    if progress:
        chosen = tqdm(chosen, desc="teacher data", unit="batch")
    eos = tokenizer.eos_token_id
    out = []
    for b in chosen:
        torch.manual_seed(batch_seed(seed, b))
        x = prompts[b * batch_size : (b + 1) * batch_size].to(device)
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=eos)
        out.append(y.cpu())
    return torch.cat(out) if out else prompts[:0]


#: ``(prompts, new_tokens, temperature, seed, top_k, top_p, batch_size) -> sequences``: how
#: :func:`teacher_sequences` has missing data sampled (:func:`generate` on one teacher, or on
#: several workers: :mod:`harness.train.worker_generation`)
Sampler = Callable[[torch.Tensor, int, float, int, int, float, int], torch.Tensor]


def teacher_sequences(model_name: str, teacher, tokenizer, samples: int, new_tokens: int,
                      temperature: float | None = None, seed: int = 0, progress: bool = True, *,
                      top_k: int | None = None, top_p: float | None = None,
                      sampler: Sampler | None = None) -> torch.Tensor:
    """Cached teacher continuations for ``model_name``; generated on first use, by ``sampler``
    when given (else :func:`generate` on ``teacher()``). Sampling settings left ``None`` take
    the training defaults (:func:`sampling_defaults`).

    Raises:
        HarnessError: the cache file was written for another model.
    """
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    sampling = {k: v if given[k] is None else given[k] for k, v in sampling_defaults().items()}
    temperature, top_k, top_p = sampling["temperature"], sampling["top_k"], sampling["top_p"]
    prompts = make_prompts(tokenizer, samples, seed)
    key = cache_key(model_name, prompts, new_tokens, temperature, seed, top_k, top_p)
    path = _cache_path(key)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("model") != model_name:
                raise HarnessError(f"teacher cache {path} was written by model "
                                   f"{meta.get('model')!r}, not {model_name!r}; delete it")
            return f.get_tensor("sequences")
    if sampler is None:
        seqs = generate(teacher(), tokenizer, prompts, new_tokens, temperature, seed, top_k,
                        top_p, progress=progress)
    else:
        seqs = sampler(prompts, new_tokens, temperature, seed, top_k, top_p, GENERATE_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp:
        save_file({"sequences": seqs.contiguous()}, str(tmp),
                  metadata={"model": model_name, "temperature": str(temperature),
                            "top_k": str(top_k), "top_p": str(top_p),
                            "new_tokens": str(new_tokens), "seed": str(seed)})
    return seqs


def generate_cli(args) -> int:
    if args.temperature <= 0:
        raise HarnessError(f"--temperature {args.temperature}: sampling needs a temperature "
                           f"above 0 (default 0.7)")
    prof = get_profile(args.profile or default_profile()).train
    samples = prof.teacher_samples if args.samples is None else args.samples
    new_tokens = prof.teacher_new_tokens if args.new_tokens is None else args.new_tokens
    model, tok = load_model(args.model, device=pick_device(args.device))
    # the CLI has no top-k/top-p flags: it makes the data a run with default settings reads
    seqs = teacher_sequences(args.model, lambda: model, tok, samples, new_tokens,
                             args.temperature, args.seed)
    top_k = sampling_defaults()["top_k"]
    print(f"teacher data: {seqs.size(0)} sequences x {seqs.size(1)} tokens "
          f"(model {args.model}, temperature {args.temperature}, top-k {top_k or 'off'})")
    return 0
