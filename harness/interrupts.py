"""Stopping a run on SIGTERM or Ctrl-C without losing the training done since the last checkpoint.

Batch systems and time-limited machines (``timeout``, SLURM, preemptible clouds) end a job with
SIGTERM, which by default kills Python on the spot: the run's row stays ``running`` and the
steps after the last periodic checkpoint are lost. While :func:`installed` is active (the CLI
wraps its command in it) SIGTERM is raised like Ctrl-C, as :class:`Interrupted`, so the run is
marked failed and the command exits 128 + signal number. Inside :func:`deferred` (the training
loop) the first signal only asks to stop: the loop finishes its step, checkpoints and raises; a
second signal stops at once. Under Ray the driver takes the signal and cancels the runs in
flight, which later resume from their last periodic checkpoint. Elsewhere (a Ray worker, a
library caller) nothing is installed and signals keep their usual meaning.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal. A KeyboardInterrupt, so every ``except Exception`` lets it
    through and the schedulers mark the run failed and stop, as for Ctrl-C."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_state: dict = {"installed": False, "deferring": False, "pending": None, "raised": None}


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _recorded(message: str, signum: int) -> Interrupted:
    """The stop for ``signum``, remembered for :func:`explain`."""
    _state["raised"] = Interrupted(message, 128 + signum)
    return _state["raised"]


def _handler(signum, _frame) -> None:
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = signum
        log.warning("%s: finishing this training step and checkpointing, then stopping "
                    "(send it again to stop at once)", _name(signum))
        return
    raise _recorded(f"interrupted by {_name(signum)}; rerun the same command to resume", signum)


@contextmanager
def installed() -> Iterator[None]:
    """Our handlers for SIGINT and SIGTERM while the block runs (main thread only; elsewhere
    a no-op, as Python allows signal handlers only there), the previous ones afterwards."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.update(installed=True, pending=None, raised=None)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.update(installed=False, deferring=False, pending=None, raised=None)


def reinstall() -> None:
    """Puts our handlers back where :func:`installed` is active and a library (Ray's
    ``ray.init``) replaced them; elsewhere does nothing."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextmanager
def deferred() -> Iterator[Callable[[], int | None]]:
    """Yields ``requested()``: the signal number asked to stop since the block began, or None.

    Signals only defer where :func:`installed` is active; elsewhere ``requested()`` stays None.
    """
    if not _state["installed"]:
        yield lambda: None
        return
    _state.update(deferring=True, pending=None)
    try:
        yield lambda: _state["pending"]
    finally:
        _state.update(deferring=False, pending=None)


def stopped(signum: int, step: int, steps: int) -> Interrupted:
    """The error a deferred stop raises once its checkpoint is written."""
    return _recorded(f"stopped by {_name(signum)} after training step {step} of {steps} "
                     f"(checkpoint saved); rerun the same command to resume", signum)


def explain(exc: KeyboardInterrupt) -> Interrupted:
    """``exc`` as an :class:`Interrupted` with its message and exit code. Some libraries catch
    the exception a signal raised and raise a bare KeyboardInterrupt instead (Ray's ``wait``
    does): then the last one this module raised stands for it, else a plain Ctrl-C."""
    if isinstance(exc, Interrupted):
        return exc
    if _state["raised"] is not None:
        return _state["raised"]
    return Interrupted("interrupted (KeyboardInterrupt); rerun the same command to resume", 130)
