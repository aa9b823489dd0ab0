"""tests/conftest.py's skip policy, run on a throwaway suite: under CI=true only the gpu tier
may skip; a skip inside a test or a whole module skipped on import fails the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

GPU_ONLY = '''
import pytest

@pytest.mark.gpu
def test_on_cuda():
    pass

def test_plain():
    pass
'''
SKIPS_INSIDE = '''
import pytest

def test_gives_up():
    pytest.skip("chromium is not installed")
'''
SKIPS_ON_IMPORT = '''
import pytest

pytest.importorskip("no_such_module_for_the_policy_test")

def test_never_collected():
    pass
'''


def _suite(tmp_path: Path, **files: str) -> Path:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    for name, text in files.items():
        (tmp_path / f"test_{name}.py").write_text(text)
    return tmp_path


def _pytest(folder: Path, ci: bool, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the gpu tier skips even on a machine with a GPU
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args, str(folder)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def mixed(tmp_path):
    return _suite(tmp_path, gpu=GPU_ONLY, inside=SKIPS_INSIDE, on_import=SKIPS_ON_IMPORT)


# make test runs on pytest-xdist workers: their skips reach the controller's accounting
@pytest.mark.parametrize("args", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_ci_fails_on_a_skip_outside_the_allow_list(mixed, args):
    res = _pytest(mixed, True, *args)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "CI=true: 2 skip(s) outside the allow-list" in res.stdout
    assert "chromium is not installed  [NOT ALLOWED in CI]" in res.stdout
    assert "no_such_module_for_the_policy_test" in res.stdout  # the module-level one too
    assert "needs CUDA (the gpu tier)  [allowed]" in res.stdout


def test_outside_ci_skips_pass_and_are_listed_by_reason(mixed):
    res = _pytest(mixed, ci=False)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "skips by reason" in res.stdout and "chromium is not installed" in res.stdout
    assert "CI=true" not in res.stdout


def test_ci_passes_with_only_the_gpu_tier_skipped(tmp_path):
    res = _pytest(_suite(tmp_path, gpu=GPU_ONLY), ci=True)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "1 passed, 1 skipped" in res.stdout
