"""The example plugin package in examples/plugin-absmax works through its declared entry point."""

import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import tomllib

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin-absmax"


@pytest.fixture
def plugin(monkeypatch):
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    eps = [EntryPoint(name=n, value=v, group="harness.methods")
           for n, v in meta["project"]["entry-points"]["harness.methods"].items()]
    import harness.registry as registry

    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: eps if group == "harness.methods" else [])
    monkeypatch.setattr(registry.METHODS, "_plugins_loaded", False)
    yield
    registry.METHODS._items.pop("absmax", None)
    sys.modules.pop("lowbit_absmax.method", None)
    sys.modules.pop("lowbit_absmax", None)


def test_example_plugin_runs_through_the_cli(plugin, cli, db_url, tmp_path):
    from harness.store import Store

    code, out, _ = cli("methods")
    assert code == 0 and "absmax" in out and "Symmetric absmax" in out
    code, out, err = cli("run", "--methods", "absmax", "--bits", "4", "--model", "tiny-llama",
                         "--tasks", "", "--max-eval-tokens", "256", "--seq-len", "128",
                         "--no-fp", "--db", db_url, "--output-dir", str(tmp_path / "runs"))
    assert code == 0, err
    (run,) = Store(db_url).runs("finished")
    assert run.method == "absmax" and run.bits == 4 and run.spec["config"]["symmetric"] is True
    # Symmetric storage has no zero points: 4 bits + one fp16 scale per group (auto: 64 here).
    assert run.group_size == 64
    bpw = Store(db_url).metric_dict(run.id)["bits_per_weight"]
    assert bpw == pytest.approx(4 + 16 / 64)
