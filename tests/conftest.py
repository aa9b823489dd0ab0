"""Shared fixtures and tier handling.

Tiers (markers): unit/integration (default, tiny-llama), ``slow`` (embedded SmolLM2),
``gpu`` (skipped without CUDA), ``browser`` (headless Chromium), ``postgres``.
``HARNESS_FAST=1`` (``make test-fast``) deselects slow tests.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'harness.db'}"


@pytest.fixture
def store(db_url):
    from harness.store import Store

    return Store(db_url)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the random 2-layer tiny-llama; do not mutate — use tiny_copy."""
    from harness.models import load_model

    return load_model("tiny-llama")


@pytest.fixture
def tiny_copy(tiny):
    import copy

    model, tok = tiny
    return copy.deepcopy(model), tok


@pytest.fixture
def cli(capsys):
    """Runs ``harness <args>`` in-process; returns (exit code, stdout, stderr)."""
    from harness.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def nan_loss(monkeypatch):
    """Makes every qat objective return a NaN loss (fault injection for the trainer's check)."""
    import methods.qat as qat

    real = qat.make_objective

    def nan_objective(config, ctx, gamma=None):
        obj = real(config, ctx, gamma)
        obj.loss = lambda inputs: torch.tensor(float("nan"), requires_grad=True)
        return obj

    monkeypatch.setattr(qat, "make_objective", nan_objective)
