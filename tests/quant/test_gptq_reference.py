"""harness.quant.gptq against the authors' implementation (tests/reference/gptq_reference.py,
IST-DASLab/gptq's ``GPTQ.fasterquant`` and ``Quantizer``, transcribed).

Where both compute the same thing they agree bit for bit, on int asym at 3 and 4 bits:

- the reference's min/max quantizer with its scale rounded to fp16 (what the harness stores;
  the reference keeps float32) and its zero point derived from that scale: the one change on
  the reference's side, in :class:`Fp16ScaleQuantizer`;
- ``pin_extremes=False`` (the harness's default pins each group's extremes to the end codes,
  which the reference does not do: see test_pinning_is_the_only_difference);
- groups: act_order with the reference's ``static_groups=True`` (the harness's act_order is
  always static); without act_order, dynamic groups with the reference's blocksize equal to the
  group size (the reference reads a group's parameters from ``W``, which is updated only at
  block ends, so for groups narrower than the block it misses the block's own updates; the
  harness aligns blocks to groups and gives the column-by-column result), and per-row
  (groupsize -1).

Both sides round half away from zero (harness) or half to even (reference): they differ only
at an exact tie, which random float32 data does not hit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.quant.formats import get_format
from harness.quant.gptq import accumulate_hessian, gptq_quantize, latent_for_storage
from tests.reference import gptq_reference as ref


class Fp16ScaleQuantizer(ref.Quantizer):
    """The reference's quantizer with the scale stored as fp16 and the zero point computed
    from the stored scale, as the harness's int format does."""

    def find_params(self, x, weight=False):
        super().find_params(x, weight=weight)
        xmin = torch.minimum(x.flatten(1).min(1)[0], torch.zeros(x.shape[0]))
        self.scale = self.scale.half().float()
        self.zero = torch.round(-xmin.reshape(self.scale.shape) / self.scale)


def _layer_and_hessian(out_f=48, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) * 0.15 + torch.eye(in_f)
    x = torch.randn(1024, in_f, generator=g) @ mix  # correlated inputs: a random SPD H
    h, _ = accumulate_hessian(None, 0, x)
    return w, h


def _reference(w, h, bits, groupsize, blocksize, actorder, static_groups):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    gptq = ref.GPTQ(layer)
    gptq.H = h.clone()
    gptq.quantizer = Fp16ScaleQuantizer()
    gptq.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    gptq.fasterquant(blocksize=blocksize, percdamp=0.01, groupsize=groupsize, actorder=actorder,
                     static_groups=static_groups)
    return layer.weight.data


# (group size, act_order, reference blocksize, reference static_groups, harness block_size)
CONFIGS = [(32, False, 32, False, 32), (32, True, 128, True, 128), (-1, False, 128, False, 128),
           (-1, True, 128, False, 128)]


def _both(bits, gs, act_order, ref_bs, static, bs, pin=False, seed=0):
    w, h = _layer_and_hessian(seed=seed)
    # the reference's range always includes 0: every row of every group here has both signs
    for g0 in range(0, w.shape[1], w.shape[1] if gs == -1 else gs):
        grp = w[:, g0:g0 + (w.shape[1] if gs == -1 else gs)]
        assert (grp.amax(1) > 0).all() and (grp.amin(1) < 0).all()
    theirs = _reference(w, h, bits, gs, ref_bs, act_order, static)
    ours = gptq_quantize(w, h, get_format("int", bits, gs), block_size=bs, act_order=act_order,
                         pin_extremes=pin).weight
    return ours, theirs


@pytest.mark.parametrize("config", CONFIGS, ids=["g32", "g32-act", "row", "row-act"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_the_reference(bits, config, seed):
    ours, theirs = _both(bits, *config, seed=seed)
    # same grid, same scales and zeros: equal dequantized weights are equal codes
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["g32", "g32-act"])
@pytest.mark.parametrize("bits", [3, 4])
def test_pinning_is_the_only_difference(bits, config):
    """With pinning (the harness's default) the weights that set a group's min and max go to
    the end codes; the reference rounds them like any other, so after the first such element
    whose rounding differs, error feedback makes the two diverge. The harness's result stays a
    fixed point of storage, the reference's does not; both beat plain rounding equally."""
    from harness.quant.gptq import output_error

    w, h = _layer_and_hessian()
    fmt = get_format("int", bits, config[0])
    pinned, theirs = _both(bits, *config, pin=True)
    unpinned, _ = _both(bits, *config, pin=False)
    assert torch.equal(unpinned, theirs)
    assert not torch.equal(pinned, theirs)
    assert torch.equal(fmt.fake_quantize(latent_for_storage(pinned, fmt),
                                         scale_dtype=torch.float16), pinned)
    assert not torch.equal(fmt.fake_quantize(theirs, scale_dtype=torch.float16), theirs)
    rtn = fmt.fake_quantize(w, scale_dtype=torch.float16)
    err_pin, err_ref, err_rtn = (output_error(w, q, h) for q in (pinned, theirs, rtn))
    assert err_pin < 0.8 * err_rtn and err_ref < 0.8 * err_rtn
    assert err_pin == pytest.approx(err_ref, rel=0.1)
