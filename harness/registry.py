"""One generic registry for methods, models, losses and formats.

Borrowed from lm-eval's ``lm_eval/api/registry.py``: decorator registration, lazy
``"module:object"`` entries resolved on first use, duplicates rejected, unknown names answered
with the known ones and the closest match. Methods, the harness's own included, arrive through the
entry-point group ``harness.methods`` (the built-ins are declared in the project's
pyproject.toml) and are loaded lazily too; two packages declaring one name, or a plugin that
fails to import, fail loudly, naming themselves.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.config import validate_method_config
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
        #: where each name came from, for the error that refuses a second source of it
        self._sources: dict[str, str] = {}
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

    def _source(self, name: str) -> str:
        return self._sources.get(name) or _target(self._items[name])

    def _duplicate(self, name: str, first: str, second: str) -> HarnessError:
        return HarnessError(f"{self.kind} {name!r} is declared twice, by {first} and by "
                            f"{second}; uninstall one of them or rename its entry point")

    def _load_plugins(self) -> None:
        """Adds the entry points of ``self._group``; refuses a name declared twice.

        A name registered directly before (a method module imported before the first lookup)
        is no duplicate when its entry point names the same object.

        Raises:
            HarnessError: two entry points, or an entry point and a registered object, claim
                one name for different objects.
        """
        if self._plugins_loaded:
            return
        found: dict[str, tuple[str, str]] = {}
        for ep in entry_points(group=self._group):
            source = f"{ep.dist.name if ep.dist else 'an unnamed package'} ({ep.value})"
            if ep.name in found:
                raise self._duplicate(ep.name, found[ep.name][1], source)
            if ep.name in self._items and _target(self._items[ep.name]) != ep.value:
                raise self._duplicate(ep.name, self._source(ep.name), source)
            found[ep.name] = (ep.value, source)
        # only once every entry point is accepted: a refused set is refused at every lookup
        self._plugins_loaded = True
        for name, (value, source) in found.items():
            self._sources[name] = source
            self._items.setdefault(name, value)

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


def _target(obj) -> str:
    """``"module:qualname"`` of a registered object, or the lazy entry string itself."""
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


#: Every method, the harness's own included, comes from this entry-point group: one way in, so
#: a plugin reusing a built-in's name is refused instead of silently shadowing it.
METHODS: Registry = Registry("method", entry_point_group="harness.methods")


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_method("mine") class Mine(Method): ...``.

    Raises:
        HarnessError: ``name`` is already taken by another class or entry point.
    """

    def wrap(cls: T) -> T:
        current = METHODS._items.get(name)
        here = _target(cls)
        # the lazy entry that points here (or at this module) is replaced by the class itself
        if current is not None and current is not cls and _target(current) not in (
                here, here.partition(":")[0]):
            raise METHODS._duplicate(name, METHODS._source(name), here)
        METHODS._items[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def get_method(name: str):
    """Returns the method class registered as ``name``.

    Raises:
        HarnessError: unknown name; when the harness's own methods are missing too, the hint
            is that the package metadata predates their entry points (reinstall).
    """
    if "fp" not in METHODS:
        # the built-ins are entry points of this package: metadata from an install made
        # before they were declared there lists none of them
        raise HarnessError(
            "no built-in method is registered: the installed lowbit-harness metadata "
            "predates their entry points; reinstall with `pip install -e .` (make setup)")
    cls = METHODS.get(name)
    if not isinstance(cls, type):
        # A lazy entry pointing at a module: the module's import registered the class.
        cls = METHODS._items.get(name)
    if not isinstance(cls, type):
        raise HarnessError(
            f"method {name!r} was imported but registered no class; decorate it with "
            f"@register_method({name!r}) or point its entry point at the class")
    if "name" not in vars(cls):  # an undecorated plugin class is known by its entry point
        cls.name = name
    return cls


def build_method(spec):
    """The method ``spec`` names, holding its config validated from ``spec.config``.

    The one place a run's method settings are read from the spec's dict: everything else asks
    the method (its typed ``config``, its ``needs()``).

    Raises:
        HarnessError: unknown method, or a config its ``Config`` rejects (one line, naming the
            valid keys).
    """
    cls = get_method(spec.method)
    return cls(validate_method_config(cls, spec.config))
