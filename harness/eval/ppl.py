"""Perplexity the way the quantization papers compute it (GPTQ / AWQ / BitDistiller scripts).

Concatenate the held-out text, cut non-overlapping windows of ``seq_len`` tokens, and report
``exp(mean NLL)`` over every predicted token. A window predicts ``seq_len - 1`` tokens; the tail
that does not fill a window is dropped, as the papers do.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.errors import HarnessError
from harness.models import no_cache
from harness.stats import ppl_interval


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens in the evaluated windows
    predicted: int  # tokens whose likelihood entered the mean
    windows: int
    seconds: float
    # mean NLL of each window, in order: the unit of the bootstrap interval and of paired
    # comparisons between runs evaluated on the same windows
    window_nll: tuple[float, ...] = ()

    def interval(self) -> tuple[float, float] | None:
        """95% bootstrap interval of the PPL over windows (None for a single window)."""
        return ppl_interval(self.window_nll)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 2048,
               max_tokens: int | None = None, batch_size: int = 1,
               progress: bool = False, desc: str = "ppl") -> PPLResult:
    """Token-level perplexity of ``model`` on the 1-D token stream ``ids``.

    Args:
        model: a causal LM returning ``.logits``.
        ids: 1-D LongTensor, the concatenated evaluation text.
        seq_len: window length (2048 in the papers).
        max_tokens: use only the first ``max_tokens`` tokens (quick profile); None = all.
        batch_size: windows per forward pass.
        progress: show a progress bar.

    Returns:
        :class:`PPLResult`.

    Raises:
        HarnessError: fewer tokens than one window.
    """
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise HarnessError(f"evaluation text has {ids.numel()} tokens, fewer than one window of "
                           f"{seq_len}; lower --seq-len or use more text")
    device = next(model.parameters()).device
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    per_window: list[torch.Tensor] = []
    start = time.perf_counter()
    batches = range(0, n_windows, batch_size)
    if progress:
        batches = tqdm(batches, desc=desc, unit="win", leave=False)
    was_training = model.training
    model.eval()
    kwargs = no_cache(model)
    try:
        for i in batches:
            x = windows[i : i + batch_size].to(device)
            logits = model(x, **kwargs).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none"
            )
            per_window.append(nll.view(x.size(0), -1).double().sum(dim=1).cpu())
    finally:
        model.train(was_training)
    sums = torch.cat(per_window)
    predicted = n_windows * (seq_len - 1)
    mean_nll = (sums.sum() / predicted).item()
    ppl = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    return PPLResult(ppl=ppl, nll=mean_nll, tokens=n_windows * seq_len, predicted=predicted,
                     windows=n_windows, seconds=time.perf_counter() - start,
                     window_nll=tuple((sums / (seq_len - 1)).tolist()))
