import ast
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace

import pytest

import harness.registry as registry
from harness.errors import HarnessError
from harness.registry import METHODS, Registry, get_method


def test_decorator_registers_and_rejects_duplicates():
    reg = Registry("widget")

    @reg.decorator("a")
    class A:
        pass

    assert reg.get("a") is A
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", object())


def test_unknown_name_lists_known_and_closest():
    reg = Registry("widget")
    reg.register("bitdistiller", object())
    reg.register("onebit", object())
    with pytest.raises(HarnessError) as exc:
        reg.get("bitdistiler")
    msg = str(exc.value)
    assert "did you mean 'bitdistiller'" in msg and "onebit" in msg


def test_lazy_entry_resolves_on_first_use():
    reg = Registry("thing")
    reg.register("path", "os.path:join")
    import os.path

    assert reg.get("path") is os.path.join


def test_builtin_methods_load_lazily():
    assert {"fp", "rtn", "clip", "qat", "bitdistiller", "onebit"} <= set(METHODS.names())
    cls = get_method("rtn")
    assert cls.name == "rtn" and cls.Config().bits == 3


def test_broken_plugin_fails_loudly_naming_itself():
    reg = Registry("method")
    reg.register("broken", "no_such_module_xyz:Thing")
    with pytest.raises(HarnessError, match="no_such_module_xyz"):
        reg.get("broken")


def test_entry_point_plugin_registers_a_method(tmp_path, monkeypatch):
    """A third-party package exposing `harness.methods` entry point adds a method."""
    pkg = tmp_path / "harness_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from harness.registry import register_method
        from harness.api import Method, MethodConfig

        class DemoConfig(MethodConfig):
            strength: float = 0.5

        @register_method("demo")
        class Demo(Method):
            """A demo plugin method."""
            Config = DemoConfig
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="demo", value="harness_plugin_demo:Demo", group="harness.methods")
    import harness.registry as registry

    reg = Registry("method", entry_point_group="harness.methods")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "harness.methods" else [])
    assert "demo" in reg.names()
    cls = reg.get("demo")
    assert cls.__name__ == "Demo" and cls.Config().strength == 0.5
    sys.modules.pop("harness_plugin_demo", None)
    METHODS._items.pop("demo", None)


def _entry_point(name: str, value: str, dist: str) -> SimpleNamespace:
    """What the registry reads of an installed ``importlib.metadata.EntryPoint``."""
    return SimpleNamespace(name=name, value=value, dist=SimpleNamespace(name=dist))


def test_builtin_methods_are_entry_points_of_the_harness():
    """The harness's own methods come in as plugins do: no list of names in harness/."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="harness.methods")}
    builtins = {"fp", "rtn", "clip", "qat", "bitdistiller", "onebit"}
    assert builtins <= set(eps), "reinstall: pip install -e . (make setup)"
    for name in builtins:
        assert eps[name].dist.name == "lowbit-harness"
        assert eps[name].load() is get_method(name)
        assert get_method(name).name == name
    assert "methods." not in (Path(registry.__file__)).read_text()


def test_a_name_declared_twice_is_refused_naming_both(monkeypatch):
    eps = [_entry_point("rtn", "methods.rtn:RTN", "lowbit-harness"),
           _entry_point("rtn", "other_pkg.quant:FastRTN", "other-pkg")]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    reg = Registry("method", entry_point_group="harness.methods")
    for _ in range(2):  # refused at every lookup, not only the first
        with pytest.raises(HarnessError) as exc:
            reg.get("rtn")
        msg = str(exc.value)
        assert "\n" not in msg and "declared twice" in msg
        assert "lowbit-harness (methods.rtn:RTN)" in msg and "other-pkg (other_pkg.quant:FastRTN)" in msg


def test_an_entry_point_may_name_a_class_already_registered(monkeypatch):
    """Importing a method module registers its class; its own entry point is no duplicate,
    another package's entry point for that name is."""
    from methods.rtn import RTN

    reg = Registry("method", entry_point_group="harness.methods")
    reg.register("rtn", RTN)
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [_entry_point("rtn", "methods.rtn:RTN", "lowbit-harness")])
    assert reg.get("rtn") is RTN
    reg = Registry("method", entry_point_group="harness.methods")
    reg.register("rtn", RTN)
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [_entry_point("rtn", "evil:RTN", "evil-pkg")])
    with pytest.raises(HarnessError, match=r"methods\.rtn:RTN.*evil-pkg \(evil:RTN\)"):
        reg.get("rtn")


def test_register_method_refuses_a_builtin_name():
    from harness.api import Method
    from harness.registry import register_method

    get_method("rtn")
    with pytest.raises(HarnessError, match="'rtn' is declared twice"):
        @register_method("rtn")
        class Shadow(Method):
            pass
    assert get_method("rtn").__name__ == "RTN"


def test_harness_never_imports_methods():
    """harness/ is the core methods plug into: it asks the registry, never ``import methods``
    (lazy imports inside functions included)."""
    root = Path(registry.__file__).resolve().parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(root.parent)}:{node.lineno} {n}" for n in names
                          if n == "methods" or n.startswith("methods.")]
    assert not offenders, offenders
