"""The offline rules every Hugging Face dataset load follows (perplexity data, lm-eval suites):
standard library only, so the core imports it without ``datasets``."""

from __future__ import annotations

import os

# What `datasets` (5.x) and `huggingface_hub` raise for a dataset that is neither cached nor
# reachable: ConnectionError when offline or without network (datasets wraps the hub's
# OfflineModeIsEnabled, itself one, and its network errors in it: measured with arc_easy, piqa
# and wikitext), FileNotFoundError for "not found" (DatasetNotFoundError,
# DataFilesNotFoundError, EmptyDatasetError and the hub's LocalEntryNotFoundError subclass it).
# Anything else loading data is a bug and surfaces as itself.
MISSING_DATA_ERRORS = (ConnectionError, FileNotFoundError)


def offline_env() -> None:
    """Data comes from the local caches only. Must run before ``datasets`` /
    ``huggingface_hub`` are imported to take effect; a user's explicit setting wins."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
