"""Compatibility module: the method contract lives in :mod:`harness.api`.

Third-party plugins written against ``methods.base`` keep working through these re-exports; new
code (the built-in methods included) imports ``harness.api``.
"""

from harness.api import (
    Calibration,
    Method,
    MethodConfig,
    Needs,
    NullRecorder,
    Objective,
    ObjectiveInputs,
    Recorder,
    RunContext,
    TeacherSampling,
)

__all__ = ["Calibration", "Method", "MethodConfig", "Needs", "NullRecorder", "Objective",
           "ObjectiveInputs", "Recorder", "RunContext", "TeacherSampling"]
