"""Security rules, checked over the source tree (cheap: ``ast`` and text, no model work).

* ``trust_remote_code`` is never switched on by the harness (every default is False);
* ``torch.load`` always passes ``weights_only=True``; no pickle, ``eval``/``exec`` or
  ``yaml.load``;
* subprocesses get argument lists, never ``shell=True``, ``os.system`` or command strings;
* no SQL built from strings: no ``sqlalchemy.text``, ``exec_driver_sql``, and nothing but a
  fixed literal (the SQLite PRAGMAs) passed to a DBAPI ``execute``;
* the dashboard binds 127.0.0.1 and opens the database read-only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "dashboard", "bench")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _trees():
    for path in SOURCES:
        yield path.relative_to(ROOT), ast.parse(path.read_text(), filename=str(path))


def _calls(tree):
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def _name(func) -> str:
    """Dotted name of a call target (``torch.load``, ``subprocess.run``, ``eval``)."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _built_string(node) -> bool:
    """A string assembled at run time: f-string, ``%``/``+`` with a string, ``.format``."""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Mod):
            return True
        return any(_built_string(side) or (isinstance(side, ast.Constant)
                                            and isinstance(side.value, str))
                   for side in (node.left, node.right))
    return isinstance(node, ast.Call) and _name(node.func).endswith(".format")


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_scan_sees_the_sources():
    names = {str(p) for p in (s.relative_to(ROOT) for s in SOURCES)}
    assert {"harness/models.py", "harness/store.py", "dashboard/launch.py"} <= names


def test_trust_remote_code_is_never_switched_on():
    for path, tree in _trees():
        for call in _calls(tree):
            value = _kw(call, "trust_remote_code")
            assert value is None or not _is_true(value), f"{path}:{call.lineno}"
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            args = fn.args.args + fn.args.kwonlyargs
            defaults = ([None] * (len(fn.args.args) - len(fn.args.defaults)) + fn.args.defaults
                        + fn.args.kw_defaults)
            for arg, default in zip(args, defaults, strict=True):
                if arg.arg == "trust_remote_code" and default is not None:
                    assert isinstance(default, ast.Constant) and default.value is False, \
                        f"{path}:{fn.lineno} {fn.name}: trust_remote_code must default to False"


def test_no_cli_flag_turns_on_remote_code():
    from harness.cli import build_parser

    assert "trust" not in build_parser().format_help().lower()


def test_torch_load_is_weights_only_and_no_unsafe_deserialisers():
    seen = 0
    for path, tree in _trees():
        for call in _calls(tree):
            name = _name(call.func)
            if name == "torch.load":
                seen += 1
                assert _is_true(_kw(call, "weights_only")), f"{path}:{call.lineno}"
            bare = isinstance(call.func, ast.Name)
            assert not (bare and name in ("eval", "exec")), f"{path}:{call.lineno} {name}"
            assert name not in ("yaml.load", "yaml.unsafe_load", "pickle.load", "pickle.loads"), \
                f"{path}:{call.lineno} {name}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "pickle" not in mods and "dill" not in mods, f"{path}:{node.lineno}"
    assert seen >= 1  # the trainer's optimizer state


SUBPROCESS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
              "subprocess.check_output"}


def test_subprocesses_take_argument_lists_without_a_shell():
    for path, tree in _trees():
        for call in _calls(tree):
            name = _name(call.func)
            assert name not in ("os.system", "os.popen"), f"{path}:{call.lineno} {name}"
            if name in SUBPROCESS:
                assert not _is_true(_kw(call, "shell")), f"{path}:{call.lineno} shell=True"
                cmd = call.args[0] if call.args else _kw(call, "args")
                is_str = isinstance(cmd, ast.Constant) and isinstance(cmd.value, str)
                assert not (is_str or _built_string(cmd)), \
                    f"{path}:{call.lineno}: command given as a string"


def test_no_sql_built_from_strings():
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                assert "text" not in {a.name for a in node.names}, f"{path}:{node.lineno}"
        for call in _calls(tree):
            name = _name(call.func)
            assert not name.endswith(("exec_driver_sql", "sqlalchemy.text")), \
                f"{path}:{call.lineno} {name}"
            if name.endswith(".execute") and call.args:  # fixed literals (PRAGMAs) are fine
                assert not _built_string(call.args[0]), \
                    f"{path}:{call.lineno}: SQL built from strings passed to execute"


def test_dashboard_binds_localhost_only():
    from dashboard.launch import command

    cmd = command("sqlite:///x.db", 8501)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert "shell" not in cmd
    for path in (ROOT / "dashboard").rglob("*.py"):
        assert "0.0.0.0" not in path.read_text(), path


def test_dashboard_opens_the_database_read_only(tmp_path):
    tree = ast.parse((ROOT / "dashboard" / "app.py").read_text())
    stores = [c for c in _calls(tree) if _name(c.func) == "Store"]
    assert stores and all(_is_true(_kw(c, "readonly")) for c in stores)

    from sqlalchemy.exc import OperationalError

    from harness.store import Run, Store

    url = f"sqlite:///{tmp_path / 'h.db'}"
    Store(url).engine.dispose()
    ro = Store(url, readonly=True)
    with pytest.raises(OperationalError, match="readonly"):
        with ro.session() as s, s.begin():
            s.add(Run(run_key="x", spec_hash="x", method="rtn", model="m", profile="quick",
                      spec={}))
