"""harness.quant.hqq against the reference package itself (mobiusml/hqq 0.2.8.post1).

``hqq`` is a test-only dependency installed by ``scripts/install-test-deps`` (CPU build,
``--no-deps`` plus ``termcolor``, which ``hqq.core.quantize`` imports) into ``.venv/test-deps``,
outside site-packages so that transformers does not import it at every model load; this module
alone puts that folder on ``sys.path``, for its own import. Without it these tests skip with the
reason. Both sides run float32 on the CPU (the reference's dtype there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from harness.quant.formats import get_format
from harness.quant.hqq import hqq_quantize, pack_qparams

DEPS = os.environ.get("HARNESS_TEST_DEPS",
                      str(Path(__file__).resolve().parents[2] / ".venv" / "test-deps"))
sys.path.insert(0, DEPS)
try:
    hqq_quantize_mod = pytest.importorskip(
        "hqq.core.quantize", reason="the reference package hqq==0.2.8.post1 is not installed "
        f"in {DEPS} (scripts/install-test-deps installs it)")
    hqq_optimize = pytest.importorskip("hqq.core.optimize")
finally:
    sys.path.remove(DEPS)
Quantizer, BaseQuantizeConfig = hqq_quantize_mod.Quantizer, hqq_quantize_mod.BaseQuantizeConfig

SHAPES = [(128, 256), (64, 512), (96, 384)]


def _weights(shape, seed, std=0.02):
    """Student-t(3) weights (heavy tails, as LLM weights have) of standard scale ``std``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g)
    chi = torch.randn(*shape, 3, generator=g).pow(2).mean(-1)
    return std * z / chi.sqrt()


def _reference(w, bits, gs):
    """``HQQLinear``'s call: ``Quantizer.quantize`` with ``BaseQuantizeConfig``'s weight
    parameters (axis=1, optimize, round_zero at 4 bits), unpacked, on the CPU."""
    params = BaseQuantizeConfig(nbits=bits, group_size=gs)["weight_quant_params"]
    w_q, meta = Quantizer.quantize(w.clone(), device="cpu", bitpack=False, **params)
    rows = w.shape[0]
    return w_q.reshape(w.shape), meta["scale"].reshape(rows, -1), meta["zero"].reshape(rows, -1)


def test_the_default_solver_is_the_legacy_one():
    # what the harness follows; a newer package switching solvers would show here first
    assert Quantizer.optimize_weights is hqq_optimize.optimize_weights_proximal_legacy
    params = BaseQuantizeConfig(nbits=3, group_size=64)["weight_quant_params"]
    assert params["axis"] == 1 and params["optimize"] and not params["round_zero"]
    assert BaseQuantizeConfig(nbits=4, group_size=64)["weight_quant_params"]["round_zero"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [64, 128])
def test_scales_zeros_and_codes_equal_the_reference(shape, bits, gs):
    w = _weights(shape, seed=bits * 1000 + gs + shape[0])
    ref_q, ref_scale, ref_zero = _reference(w, bits, gs)
    res = hqq_quantize(w, get_format("intfz", bits, gs))
    torch.testing.assert_close(res.scale, ref_scale, atol=0, rtol=1e-4)
    torch.testing.assert_close(res.zero_frac, ref_zero, atol=1e-4, rtol=0)
    assert torch.equal(res.codes_frac.float(), ref_q)  # W_q, codes before packing
    # stored: HQQLinear casts scale and zero to its fp16 compute dtype; so does intfz
    assert torch.equal(res.qparams.scales, ref_scale.half())
    assert torch.equal(res.qparams.zeros, ref_zero.half())
    ref_w = (ref_q.reshape(shape[0], -1, gs) - ref_zero.half().float().unsqueeze(-1)) * \
        ref_scale.half().float().unsqueeze(-1)
    stored = pack_qparams(res.qparams, get_format("intfz", bits, gs)).dequantize()
    torch.testing.assert_close(stored, ref_w.reshape(shape), atol=0, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_large_weights_where_the_shrinkage_acts(bits):
    """At unit scale the lp shrinkage keeps residuals (it zeroes those below ~0.17 at beta
    10), so beta's schedule matters: the reference holds it at 10 (kappa unused)."""
    w = _weights((64, 256), seed=7, std=1.0)
    _, ref_scale, ref_zero = _reference(w, bits, 64)
    res = hqq_quantize(w, get_format("intfz", bits, 64))
    torch.testing.assert_close(res.zero_frac, ref_zero, atol=1e-4, rtol=0)
    grown = hqq_quantize(w, get_format("intfz", bits, 64), kappa=1.01)
    assert not torch.allclose(grown.zero_frac, ref_zero, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_the_legacy_solver_called_directly(bits):
    """``optimize_weights_proximal_legacy`` on our own start (inverse scale, -min * t)."""
    w = _weights((64, 512), seed=3)
    xg = w.reshape(-1, 128)
    qmax = 2**bits - 1
    inv = qmax / (xg.amax(1, keepdim=True) - xg.amin(1, keepdim=True))
    zero = -xg.amin(1, keepdim=True) * inv
    _, inv_out, ref_zero = hqq_optimize.optimize_weights_proximal_legacy(
        xg, inv, zero, [0, qmax], axis=1, device="cpu",
        opt_params={"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20})
    res = hqq_quantize(w, get_format("intfz", bits, 128), round_zero=False)
    torch.testing.assert_close(res.zero_frac, ref_zero.reshape(64, -1), atol=1e-4, rtol=0)
    # the solver returns HQQ's inverse scale unchanged; Quantizer.quantize inverts it after
    torch.testing.assert_close(res.scale, 1.0 / inv_out.reshape(64, -1), atol=0, rtol=0)
