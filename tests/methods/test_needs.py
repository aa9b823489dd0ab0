"""Methods declare what their runs read (``Method.needs()``); the harness asks them instead of
reading method settings from the spec's dict."""

from __future__ import annotations

import pytest

from harness.api import Calibration, Needs, TeacherSampling
from harness.errors import HarnessError
from harness.orchestration.plan import build_spec
from harness.registry import build_method


def _old_teacher_key(spec):
    """The Ray scheduler's rule before methods declared their needs (the dict's keys)."""
    from harness.train.config import TrainConfig

    cfg = spec.config
    train = cfg.get("train")
    if not isinstance(train, dict):
        return None
    if cfg.get("data") != "teacher" and cfg.get("loss") != "cakld":
        return None
    t = TrainConfig(**train)
    return (spec.model, spec.model_key, t.teacher_samples, t.teacher_new_tokens, t.temperature,
            t.teacher_top_k, t.teacher_top_p)


@pytest.mark.parametrize("method,over", [
    ("fp", {}), ("rtn", {}), ("clip", {}), ("clip", {"clip": False}),
    ("qat", {}), ("qat", {"data": "corpus"}), ("qat", {"data": "corpus", "loss": "cakld"}),
    ("qat", {"loss": "fkl", "train": {"teacher_top_k": 0, "temperature": 1.0}}),
    ("bitdistiller", {}), ("bitdistiller", {"data": "corpus"}),
    ("bitdistiller", {"data": "corpus", "loss": "fkl"}),
    ("bitdistiller", {"train": {"teacher_samples": 8, "teacher_new_tokens": 16}}),
    ("onebit", {}), ("onebit", {"data": "corpus"}),
])
@pytest.mark.parametrize("profile", ["quick", "full"])
def test_teacher_key_is_the_one_the_config_dict_gave(method, over, profile):
    """Ray makes the same runs wait for the same teacher-data generation as before."""
    from harness.orchestration.ray_scheduler import teacher_key

    spec = build_spec("tiny-llama", method, over, profile)
    assert teacher_key(spec) == _old_teacher_key(spec)


def test_builtin_needs():
    def needs(method, **over):
        return build_method(build_spec("tiny-llama", method, over, "quick")).needs()

    assert needs("fp") == needs("rtn") == Needs()
    assert needs("clip") == Needs(calibration=Calibration(samples=16, seq_len=512))
    assert needs("clip", calib_samples=4, calib_seq_len=64).calibration == Calibration(4, 64)
    assert needs("clip", clip=False) == Needs()
    sampling = TeacherSampling(samples=64, new_tokens=256, temperature=0.7, top_k=50, top_p=1.0)
    assert needs("qat") == Needs(teacher_data=sampling, calibration=Calibration(),
                                 teacher_model=False)
    assert needs("qat", data="corpus").teacher_data is None
    assert needs("bitdistiller").teacher_model and needs("bitdistiller").teacher_data == sampling
    assert needs("onebit") == Needs(teacher_data=sampling, teacher_model=True)
    assert needs("onebit", data="corpus") == Needs(teacher_model=True)


def test_build_method_hands_the_method_its_typed_config():
    spec = build_spec("tiny-llama", "bitdistiller", {"bits": 2}, "quick")
    method = build_method(spec)
    assert type(method).__name__ == "BitDistiller"
    assert method.config.bits == 2 and method.config.train.steps == 20  # the profile's budget
    assert build_method(spec).config == method.config  # validated the same way each time
    bad = spec.model_copy(update={"config": {**spec.config, "bitz": 2}})
    with pytest.raises(HarnessError) as exc:
        build_method(bad)
    assert "\n" not in str(exc.value) and "unknown key 'bitz'" in str(exc.value)


def test_calibration_blocks_are_sized_by_the_declaration(monkeypatch, tmp_path):
    """The runner reads the calibration size from ``needs()``; a method declaring none gets the
    defaults (16 x 512)."""
    import torch

    from harness import data
    from harness.api import NullRecorder
    from harness.orchestration.runner import build_context

    asked = []
    monkeypatch.setattr(data, "token_blocks", lambda tok, split, seq, n, seed: asked.append(
        (split, seq, n)) or torch.zeros(n, seq, dtype=torch.long))
    for method, over in [("clip", {"calib_samples": 3, "calib_seq_len": 32}), ("rtn", {})]:
        spec = build_spec("tiny-llama", method, over, "quick")
        ctx = build_context(spec, build_method(spec), None, None, NullRecorder(), tmp_path,
                            torch.device("cpu"))
        ctx.calibration()
    assert asked == [("calibration", 32, 3), ("calibration", 512, 16)]
