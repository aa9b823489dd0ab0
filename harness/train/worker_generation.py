"""A run's teacher data sampled on its N training workers' devices (Ray tasks).

Generation is the long part of distillation's data at the papers' sizes (8,000 continuations of
1,024 tokens from a 7B teacher): a run trained on N workers samples on N devices too. Batch
``b`` of the prompts goes to worker ``b mod N``; each batch is sampled from its own seed
(:func:`harness.train.teacher_data.batch_seed`), so the data, and the cache file they land in,
are those one process would sample, whatever N.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.errors import HarnessError
from harness.ray_cluster import threads_per_worker, worker_failure_line, workers_ready
from harness.train.teacher_data import batch_count, generate


def _sample_part(model: str, prompts: torch.Tensor, batches: list[int], sampling: dict,
                 threads: int, use_gpu: bool) -> torch.Tensor:
    """One worker's batches (a Ray task: it loads its own teacher on its own device)."""
    from harness.models import load_model

    if threads:
        torch.set_num_threads(threads)
    teacher, tokenizer = load_model(model, device="cuda" if use_gpu else "cpu")
    return generate(teacher, tokenizer, prompts, batches=batches, progress=False, **sampling)


class WorkerSampler:
    """A :data:`~harness.train.teacher_data.Sampler` that spreads the batches over ``workers``
    Ray tasks, one GPU (or one CPU) each, each loading ``model`` as the teacher;
    ``on_sampled(workers)`` is called once the data are sampled (not when they were cached).

    Calling it raises HarnessError (one line) when a worker fails or dies; nothing is cached
    then, and the rerun samples again.
    """

    def __init__(self, model: str, workers: int, use_gpu: bool, ray_address: str | None = None,
                 on_sampled: Callable[[int], None] | None = None) -> None:
        self.model, self.workers, self.use_gpu = model, workers, use_gpu
        self.ray_address, self.on_sampled = ray_address, on_sampled

    def __call__(self, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int,
                 top_k: int, top_p: float, batch_size: int) -> torch.Tensor:
        import ray

        workers_ready(self.workers, self.use_gpu, self.ray_address)
        n = batch_count(prompts, batch_size)
        parts = [list(range(r, n, self.workers)) for r in range(min(self.workers, n))]
        sampling = dict(new_tokens=new_tokens, temperature=temperature, seed=seed, top_k=top_k,
                        top_p=top_p, batch_size=batch_size)
        threads = threads_per_worker(self.workers, self.use_gpu)
        task = ray.remote(_sample_part).options(num_gpus=1 if self.use_gpu else 0,
                                                num_cpus=0 if self.use_gpu else 1,
                                                max_retries=0)
        refs = [task.remote(self.model, prompts, part, sampling, threads, self.use_gpu)
                for part in parts]
        try:
            results = ray.get(refs)
        except Exception as exc:
            raise HarnessError(worker_failure_line(
                exc, len(parts), "teacher-data", "rerun to sample them again")) from None
        rows: dict[int, torch.Tensor] = {}
        for part, seqs in zip(parts, results, strict=True):
            for i, b in enumerate(part):  # only a part's last batch can be short
                rows[b] = seqs[i * batch_size : (i + 1) * batch_size]
        if self.on_sampled is not None:
            self.on_sampled(len(parts))
        return torch.cat([rows[b] for b in range(n)])
