"""User-facing errors: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations


class HarnessError(Exception):
    """Bad input or an unusable environment. The CLI prints ``error: <message>`` and exits 2.

    The message must name the problem and how to fix it, in one line.
    """

    exit_code = 2


class TrainingDiverged(HarnessError):
    """The loss became NaN or infinite: the run is marked failed with this message."""
