"""Shared fixtures and tier handling.

Tiers (markers): unit/integration (default, tiny-llama), ``slow`` (embedded SmolLM2),
``gpu`` (skipped without CUDA), ``browser`` (headless Chromium), ``postgres``.

Skips are accounted for: the summary lists every skip with its reason, and under ``CI=true``
(``.ci/run`` sets it) a skip outside :data:`ALLOWED_SKIPS` fails the run, so a tier whose
tool failed to install, or a fixture that skips, cannot pass unnoticed.
"""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (make test) each worker's torch takes its share of the cores: two workers
# of two threads each on two cores spin against each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# The one skip a CI machine may take: it has no GPU. Anything else that skips there (a browser
# or PostgreSQL that did not install, a compiler missing, a fixture giving up) is a failure.
GPU_SKIP = "needs CUDA (the gpu tier)"
ALLOWED_SKIPS = {GPU_SKIP}
_skipped: list[tuple[str, str]] = []  # (nodeid, reason) of every skipped test


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=GPU_SKIP)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    """A module that skips while it is imported (``importorskip`` at the top) never reaches
    the test phase: its skip is counted here."""
    if report.skipped:
        _skipped.append((report.nodeid, _skip_reason(report)))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unexpected_skips() -> list[tuple[str, str]]:
    return [(node, why) for node, why in _skipped if why not in ALLOWED_SKIPS]


def pytest_sessionfinish(session, exitstatus):
    if _in_ci() and _unexpected_skips() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _skipped:
        return
    tr = terminalreporter
    tr.section("skips by reason")
    counts: dict[str, int] = {}
    for _, why in _skipped:
        counts[why] = counts.get(why, 0) + 1
    for why, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        tag = "allowed" if why in ALLOWED_SKIPS else "NOT ALLOWED in CI"
        tr.write_line(f"{n:5d}  {why}  [{tag}]")
    unexpected = _unexpected_skips()
    if unexpected and _in_ci():
        tr.write_line(f"CI=true: {len(unexpected)} skip(s) outside the allow-list "
                      f"({', '.join(sorted(ALLOWED_SKIPS))}); the run fails:", red=True)
        for node, why in unexpected:
            tr.write_line(f"  {node}: {why}", red=True)


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


def _fingerprint(model) -> str:
    """Everything a test could leave changed on a model: values, dtypes, devices and
    requires_grad of its tensors (buffers too), module types, train/eval mode, hooks."""
    import hashlib

    h = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    with torch.no_grad():
        for name, t in tensors:  # sums, not every byte: a test's change moves them, cheaper
            x = t.detach().float()
            h.update(f"{name}:{t.dtype}:{t.device}:{t.requires_grad}:{tuple(t.shape)}:"
                     f"{x.sum().item()!r}:{torch.dot(x.reshape(-1), x.reshape(-1)).item()!r}".encode())
    for name, m in model.named_modules():
        hooks = sum(len(getattr(m, a, {})) for a in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
            "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"))
        h.update(f"{name}:{type(m).__qualname__}:{m.training}:{hooks}".encode())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _threads_unchanged(request):
    """torch's thread count is this process's: a test that changes it (a worker body run
    in-process sets its share) changes the summation order of every test after it."""
    before = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == before, (
        f"{request.node.nodeid} changed torch's thread count {before} -> "
        f"{torch.get_num_threads()}; restore it")


@pytest.fixture(autouse=True)
def _shared_tiny_unchanged(request):
    """The session's tiny model is shared: a test that changes it changes the tests after it
    (a hook left on it once made an unrelated test fail). Such a test errors here; it should
    take ``tiny_copy``."""
    if "tiny" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("tiny")[0]
    before = _fingerprint(model)
    yield
    assert _fingerprint(model) == before, (
        f"{request.node.nodeid} changed the session's shared tiny model; take tiny_copy")


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


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """Empty, offline Hugging Face caches under tmp_path; yields (datasets cache, hub cache)."""
    import datasets
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache, hub = home / "datasets", home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    # Both libraries read these at import, which happened before the test.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    from harness.eval import ppl_data

    monkeypatch.setattr(ppl_data, "_IDS", {})
    return cache, hub
