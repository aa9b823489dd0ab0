"""Which torch device a run, an export or teacher generation uses, checked against this
machine before any work starts."""

from __future__ import annotations

import torch

from harness.errors import HarnessError


def pick_device(requested: str | None = None, here: bool = True) -> torch.device:
    """``requested`` (cpu, cuda, cuda:N, or another torch device), else CUDA where available,
    else the CPU.

    Args:
        here: the device is for this machine (not a Ray worker's): check it exists.

    Raises:
        HarnessError: an unknown device, or (``here``) a GPU this machine does not have.
    """
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise HarnessError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and here:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise HarnessError(f"--device {requested}: this machine has no CUDA GPU usable by "
                               f"torch {torch.__version__}; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise HarnessError(f"--device {requested}: this machine has {n} GPU(s); use "
                               f"cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and here and not torch.backends.mps.is_available():
        raise HarnessError(f"--device {requested}: this machine has no Apple GPU; use --device "
                           f"cpu")
    return dev
