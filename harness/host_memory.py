"""Host memory: keep freed blocks in the process instead of handing them back to the kernel.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free. A CPU training step allocates and frees
hundreds of such tensors (logits of 4x256 tokens over a 49k vocabulary are 200 MB), so every
step page-faults the same memory in again, zero-filled by the kernel. Serving large blocks from
the heap and never trimming it makes the step reuse its pages. Measured on the 2-core CPU
(2026-12-05): a BitDistiller run of SmolLM2 (4 steps of 4x256 tokens) went from 13.3 s to
9.3 s per step and its evaluation from 542 to 642 tokens/s, with bit-identical losses and
perplexity, for 15% more peak resident memory (7.1 -> 8.1 GB); ``bench/host_memory.py``
(an NF3 cross-entropy step) 0.86x the step time.

Called by the ``harness`` console command and the Ray run tasks, not on import: a library
caller's process keeps its own allocator settings. ``HARNESS_MALLOC=default`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it accepts
NEVER_TRIM = 2**31 - 1

ENV = "HARNESS_MALLOC"


def keep_freed_memory() -> bool:
    """Tells glibc to serve large blocks from the heap and not to trim it. Returns whether the
    setting took (False off glibc, with ``HARNESS_MALLOC=default``, or if mallopt refused)."""
    if os.environ.get(ENV, "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        # gnu_get_libc_version exists in glibc only; musl's mallopt is a no-op stub
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
