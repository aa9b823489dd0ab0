"""Modules use each other's public names only: a leading underscore means "this module's
business", so importing one from another module couples them behind the reader's back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "harness", "methods", "dashboard"):
            found += [f"{path.relative_to(root)}: {a.name} from {node.module}"
                      for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = [hit for package in ("harness", "methods", "dashboard")
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for hit in _private_imports(path)]
    assert offenders == []


def test_the_check_sees_a_private_import(tmp_path):
    bad = tmp_path / "harness" / "probe.py"
    bad.parent.mkdir()
    bad.write_text("import os\nfrom harness.quant.primitives import _hidden, grouped\n")
    assert _private_imports(bad, tmp_path) == [
        "harness/probe.py: _hidden from harness.quant.primitives"]
