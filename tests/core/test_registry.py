import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

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
        from methods.base import Method, MethodConfig

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
