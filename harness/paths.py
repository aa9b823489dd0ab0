"""Where the harness keeps caches (corpus, converted models, teacher data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$HARNESS_CACHE`` or ``~/.cache/lowbit-harness``; created on first use."""
    root = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "lowbit-harness"))
    root.mkdir(parents=True, exist_ok=True)
    return root
