"""User-facing errors: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations

import importlib


class HarnessError(Exception):
    """Bad input or an unusable environment. The CLI prints ``error: <message>`` and exits 2.

    The message must name the problem and how to fix it, in one line.
    """

    exit_code = 2


def require_module(module: str, feature: str):
    """Imports ``module`` or raises a one-line error saying ``feature`` is unavailable."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise HarnessError(f"{feature}: not available in this version of lowbit-harness "
                               f"(module {module} is missing); use the CLI flags instead") from None
        raise HarnessError(f"{feature} needs the package {exc.name!r}; install it "
                           f"(pip install {exc.name})") from None


class TrainingDiverged(HarnessError):
    """The loss became NaN or infinite: the run is marked failed with this message."""


def describe_error(exc: BaseException) -> str:
    """One line for users; the traceback goes to the log (and the store for unexpected ones)."""
    if isinstance(exc, HarnessError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
