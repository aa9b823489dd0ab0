"""Where the harness keeps caches (corpus, converted models, teacher data)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$HARNESS_CACHE`` or ``~/.cache/lowbit-harness``; created on first use."""
    root = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "lowbit-harness"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def private_tmp(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place. The caches are shared
    by every process on the machine (a sweep's concurrent runs, Ray's workers): a name of its
    own keeps two writers of the same entry from truncating or moving each other's file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yields the file to write instead of ``path`` (:func:`private_tmp`) and renames it onto
    ``path`` once the block finishes: a reader sees the old file or the whole new one, never a
    torn one; a block that fails leaves nothing behind."""
    tmp = private_tmp(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
