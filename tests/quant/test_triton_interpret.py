"""The Triton kernels, run by Triton's interpreter on the CPU, equal the op-by-op reference graph:
forward bit for bit, backward within float tolerance, and packing stores the codes the kernel
trains with. The same kernels run compiled on CUDA in tests/quant/test_triton_fq.py (marker
gpu); this file keeps their logic tested where no GPU is (CI). Triton is a dev dependency:
imported, never skipped."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton  # noqa: F401  (a dev dependency: a missing one fails here, it does not skip)

from tests.quant import triton_interpret_cases as cases

HERE = Path(__file__).parent


def _interpreted(*args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "triton_interpret_cases.py"), *args],
                          env=env, capture_output=True, text=True, timeout=900,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def findings() -> dict:
    return _interpreted()


@pytest.mark.parametrize("case,scales,dtype", [
    pytest.param(*c, id=cases.case_id(*c))
    for c in itertools.product(cases.FORMATS, cases.SCALES, cases.DTYPES)])
def test_interpreted_kernel_matches_reference(findings, case, scales, dtype):
    got = findings["cases"][cases.case_id(case, scales, dtype)]
    torch_dtype = f"torch.{dtype}"
    assert got["dtypes"] == [torch_dtype, torch_dtype]
    assert got["forward_equal"], got
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert got["grad_max_diff"] <= tol * (1 + got["grad_scale"]), got


def test_interpreted_kernel_writes_the_autocast_dtype(findings):
    assert findings["extras"]["autocast_out"] == ["torch.bfloat16", True]


def test_group_stats_are_kept_only_when_a_gradient_is_needed(findings):
    stats = findings["extras"]["stats"]
    assert stats == {"no_grad_equal": True, "shape": [16, 2], "max_ok": True, "min_ok": True}


def test_packing_stores_the_codes_the_kernel_trains_with(findings):
    packed = findings["extras"]["packing_equal"]
    assert len(packed) == len(cases.FORMATS)
    assert all(packed.values()), packed


def test_other_launch_shapes_give_the_same_values_and_gradients(findings):
    assert findings["extras"]["launch_shapes"] == {
        "int2": [True, True], "int3-sym": [True, True], "nf3": [True, True]}


@pytest.mark.parametrize("case", [
    f"{f}{b}-g{g}{'-sym' if s else ''}{'-detach' if d else ''}"
    for (f, b, g, s), d in itertools.product(cases.MANY_FORMATS, (False, True))])
def test_many_weights_in_one_launch_equal_one_launch_each(findings, case):
    assert findings["many"][case] == {"forward_equal": True, "grads_equal": True,
                                      "unused_grad_zero": True, "one_node": True}


@pytest.mark.parametrize("case,batches", [("int2-g32", 1), ("nf3-g-1", 2)])
def test_batched_model_equals_per_layer_model(findings, case, batches):
    got = findings["batched_model"][case]
    assert got["loss_equal"]
    assert got["grad_max_diff"] < 1e-6
    # 2 layers x 7 linears: 14 per-layer calls, or one launch per (format, group width).
    assert got["calls_per_layer_model"] == {"per_layer": 14, "many": 0}
    assert got["calls_batched_model"] == {"per_layer": 0, "many": batches}
    assert got["batches"] == batches
    assert got["cleared"] and got["after_remove"] == {"per_layer": 14, "many": 0}


@pytest.mark.slow
def test_interpreted_kernel_is_exact_on_smollm2_weights():
    """bf16-born weights put quotients exactly on half-integers far more often than random
    ones: the per-element division must be the correctly rounded one to round them alike."""
    found = _interpreted("--smollm2")
    assert len(found) == 4
    for case, got in found.items():
        assert got["weights"] == 3_538_944, case  # SmolLM2's first decoder block
        assert got["differing"] == 0, (case, got)
