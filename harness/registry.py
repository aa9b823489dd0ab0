"""One generic registry for methods, models, losses and formats.

Borrowed from lm-eval's ``lm_eval/api/registry.py``: decorator registration, lazy
``"module:object"`` entries resolved on first use, duplicates rejected, unknown names answered
with the known ones and the closest match. Third-party methods arrive through the entry-point
group ``harness.methods`` and are loaded lazily too; a plugin that fails to import fails loudly,
naming itself.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.errors import HarnessError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map with lazy entries.

    Args:
        kind: what the registry holds ("method", "model"...), used in error messages.
        entry_point_group: optional ``importlib.metadata`` group scanned on first lookup.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T | str] = {}
        self._group = entry_point_group
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, obj: T | str) -> None:
        """Registers ``obj`` (or a lazy ``"module:attr"`` string) under ``name``.

        Raises:
            ValueError: ``name`` is already taken by a different object.
        """
        current = self._items.get(name)
        if current is not None and current is not obj and not isinstance(current, str):
            raise ValueError(f"{self.kind} {name!r} is already registered ({current!r})")
        self._items[name] = obj

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self.register(name, obj)
            return obj

        return wrap

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self._group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.value

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """Returns the object for ``name``, importing it on first use.

        Raises:
            HarnessError: unknown name (lists the known ones and the closest match) or a lazy
                entry that fails to import (names the plugin).
        """
        self._load_plugins()
        if name not in self._items:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise HarnessError(
                f"unknown {self.kind} {name!r}{hint} Known {self.kind}s: {', '.join(known)}"
            )
        obj = self._items[name]
        if isinstance(obj, str):
            module_name, _, attr = obj.partition(":")
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # a broken plugin must fail loudly, naming itself
                raise HarnessError(
                    f"{self.kind} {name!r} could not be imported from {module_name!r}: "
                    f"{type(exc).__name__}: {exc}; fix or uninstall that package"
                ) from exc
            resolved = module
            for part in attr.split(".") if attr else []:
                resolved = getattr(resolved, part)
            obj = resolved
            # Importing the module usually registered the real object already; keep that.
            if isinstance(self._items.get(name), str):
                self._items[name] = obj
            obj = self._items[name]
        return obj  # type: ignore[return-value]

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS: Registry = Registry("method", entry_point_group="harness.methods")

# The harness's own methods, imported on first lookup so `harness methods` stays cheap.
for _name in ("fp", "rtn", "clip", "qat", "bitdistiller", "onebit"):
    METHODS.register(_name, f"methods.{_name}")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_method("mine") class Mine(Method): ...``."""

    def wrap(cls: T) -> T:
        METHODS._items[name] = cls  # replaces the lazy string that pointed here
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def get_method(name: str):
    """Returns the method class registered as ``name``."""
    cls = METHODS.get(name)
    if isinstance(cls, type):
        return cls
    # A lazy entry pointing at a module: the module's import registered the class.
    obj = METHODS._items.get(name)
    if isinstance(obj, type):
        return obj
    raise HarnessError(
        f"method {name!r} was imported but registered no class; decorate it with "
        f"@register_method({name!r})"
    )
