"""ParetoQ's training-form linear: a latent weight and a learnable alpha per row (or group).

A ``QuantLinear`` (so the harness's packing, export, checkpoints and evaluation treat it as any
quantized layer) whose forward is ``F.linear(x, level(W / alpha) * alpha)`` with ParetoQ's
straight-through gradients for both ``W`` and ``alpha`` (``harness_paretoq.formats``).
``pack()`` stores the codes on the trained alpha's grid plus alpha as the fp16 scales, and
becomes the harness's ``PackedLinear``: the packed weight equals the last training forward's.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.errors import HarnessError
from harness.quant.formats import QuantFormat
from harness.quant.linear import PackedLinear, QuantLinear
from harness.quant.packed import PackedTensor
from harness_paretoq.formats import ParetoQFormat


class ParetoQLinear(QuantLinear):
    """Training form: ``weight`` (latent) and ``alpha`` ``[out, n_groups]``, both trained.

    ``detach_scales=True`` freezes alpha at its initial value (an ablation; ParetoQ learns it).
    """

    def __init__(self, in_features: int, out_features: int, qformat: QuantFormat,
                 bias: bool = True, detach_scales: bool = False) -> None:
        super().__init__(in_features, out_features, qformat, bias, detach_scales)
        if not isinstance(self.format, ParetoQFormat):
            raise HarnessError(f"ParetoQLinear needs a ParetoQ format (seq, seq_ternary, lsq), "
                               f"got fmt={qformat.fmt}; use QuantLinear for other formats")
        n_groups = self.format.n_groups(in_features)
        self.alpha = nn.Parameter(torch.ones(out_features, n_groups),
                                  requires_grad=not detach_scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qformat: QuantFormat,
                    detach_scales: bool = False) -> ParetoQLinear:
        """``linear``'s weight as the latent weight, alpha at the reference's initial value."""
        m = super().from_linear(linear, qformat, detach_scales)
        with torch.no_grad():
            m.alpha.copy_(m.format.init_scales(m.weight))
        return m

    def dequantized_weight(self) -> torch.Tensor:
        out_dtype = None
        device = self.weight.device.type
        if torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device)
        return self.format.fake_quantize_scaled(self.weight, self.alpha,
                                                scale_dtype=torch.float16, out_dtype=out_dtype)

    def packed_tensor(self) -> PackedTensor:
        return self.format.pack_scaled(self.weight.detach(), self.alpha.detach())

    @torch.no_grad()
    def pack(self) -> PackedLinear:
        """Converts this module in place to ``PackedLinear`` (alpha goes into its scales)."""
        p = self.packed_tensor()
        del self.weight, self.alpha
        self.__class__ = PackedLinear
        self._install(p.tensors())
        return self
