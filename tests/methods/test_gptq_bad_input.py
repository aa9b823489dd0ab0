"""gptq's bad input through the real CLI (the contract of tests/test_bad_inputs.py).

* ``--set fmt=binary``: refused while the runs are planned (the shared weight-format check):
  one ``error:`` line naming the fix, exit 2, no run row.
* too few calibration tokens for a full-rank Hessian (``calib_samples * calib_seq_len`` below
  the widest quantized layer's inputs): the minimum depends on the model, so the planner asks
  the method (``Method.check_shapes``) with the quantized layers' input sizes it reads from the
  model's config: the same one line, exit 2, no run row; also for a trained method started
  from gptq (``init=gptq``).
"""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from methods.gptq import GPTQConfig, check_calibration
from tests.test_bad_inputs import QUICK, _error_lines, in_process

# tiny-llama's widest decoder linear is down_proj, 192 inputs
WIDEST = 192


def _run(tmp_path, *sets):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    code, err = in_process("run", "--no-fp", "--methods", "gptq", *sets, *QUICK, "--db", db,
                           "--output-dir", tmp_path / "runs")
    return code, err, db


def _runs(db):
    from pathlib import Path

    from harness.store import Store

    if not Path(db.removeprefix("sqlite:///")).exists():
        return []
    return Store(db, readonly=True).runs()


def test_binary_format_is_refused_before_any_run(tmp_path):
    code, err, db = _run(tmp_path, "--set", "fmt=binary")
    assert code == 2, err
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert "fmt=binary" in line and "--methods onebit" in line
    assert _runs(db) == []


@pytest.mark.parametrize("method", ["gptq", "qat"])
def test_too_little_calibration_is_refused_before_any_run(tmp_path, method):
    extra = ["--set", "init=gptq", "--set", "fmt=int"] if method == "qat" else []
    db = f"sqlite:///{tmp_path / 'x.db'}"
    code, err = in_process("run", "--no-fp", "--methods", method, "--set", "calib_samples=2",
                           "--set", "calib_seq_len=32", *extra, *QUICK, "--db", db,
                           "--output-dir", tmp_path / "runs")
    assert code == 2, err
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert f"at least {WIDEST} calibration tokens" in line
    assert "calib_samples*calib_seq_len = 2*32 = 64" in line
    assert "raise calib_samples or calib_seq_len" in line
    assert _runs(db) == []


@pytest.mark.parametrize("samples, seq_len, ok", [(6, 32, True), (1, 192, True), (5, 32, False),
                                                  (1, 191, False)])
def test_calibration_minimum_is_the_widest_input(tiny, samples, seq_len, ok):
    model, _ = tiny
    from harness.quant.modules import decoder_linear_names

    modules = dict(model.named_modules())
    assert max(modules[n].in_features for n in decoder_linear_names(model)) == WIDEST
    config = GPTQConfig(calib_samples=samples, calib_seq_len=seq_len)
    dims = {modules[n].in_features for n in decoder_linear_names(model)}
    if ok:
        check_calibration(dims, config)
    else:
        with pytest.raises(HarnessError, match=f"at least {WIDEST} calibration tokens"):
            check_calibration(dims, config)
