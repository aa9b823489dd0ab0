"""The example plugin in examples/plugin-absmax, installed for real, runs through the CLI.

pip installs a copy of it (its build would otherwise leave build/ and *.egg-info in the
checkout) with ``--target`` into a temporary folder, which the CLI subprocess gets on
PYTHONPATH: the entry point is found from the installed metadata, as after ``pip install``, and
the project's .venv is left unchanged. Offline: no index, no dependencies, no build isolation
(setuptools comes from the .venv).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plugin-absmax"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict:
    """Environment for a harness subprocess that has the example plugin installed."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(EXAMPLE, tmp / "src", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--no-cache-dir", "--quiet",
         "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (site / "lowbit_absmax").is_dir(), sorted(p.name for p in site.iterdir())
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def harness(env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_installed_plugin_runs_next_to_rtn_through_the_cli(plugin_env, tmp_path):
    """README "Adding a method": `harness run --methods rtn,absmax --bits 4` after installing
    the package puts both in one table and database."""
    from harness.store import Store

    db = f"sqlite:///{tmp_path / 'h.db'}"
    methods = harness(plugin_env, "methods")  # side by side: each spends seconds on imports
    run = harness(plugin_env, "run", "--methods", "rtn,absmax", "--bits", "4",
                  "--model", "tiny-llama", "--tasks", "", "--max-eval-tokens", "256",
                  "--seq-len", "128", "--db", db, "--output-dir", tmp_path / "runs")
    try:
        out, err = methods.communicate(timeout=300)
        assert methods.returncode == 0, err[-3000:]
        assert "absmax" in out and "Symmetric absmax" in out, out
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        assert " absmax " in out and " rtn " in out, out
    finally:  # a failed assertion leaves no process behind
        for proc in (methods, run):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    store = Store(db, readonly=True)
    runs = {r.method: r for r in store.runs("finished")}
    assert set(runs) == {"fp", "rtn", "absmax"}, [(r.method, r.status) for r in store.runs()]
    absmax, rtn = runs["absmax"], runs["rtn"]
    assert absmax.bits == 4 and absmax.spec["config"]["symmetric"] is True
    assert rtn.bits == 4 and rtn.spec["config"]["symmetric"] is False
    # Symmetric storage has no zero points: 4 bits + one fp16 scale per group (auto: 64 here);
    # rtn's asymmetric grid also stores a zero point per group.
    assert absmax.group_size == 64
    bpw = {m: store.metric_dict(r.id)["bits_per_weight"] for m, r in runs.items() if m != "fp"}
    assert bpw["absmax"] == pytest.approx(4 + 16 / 64)
    assert bpw["rtn"] > bpw["absmax"]
