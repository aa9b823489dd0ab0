import pytest
import torch

from harness.quant import fake_quantize, pack
from harness.quant.packed import PackedTensor


@pytest.mark.parametrize("fmt,bits,group,sym", [
    ("int", 2, 64, False), ("int", 3, 32, False), ("int", 4, -1, False), ("int", 2, 64, True),
    ("int", 1, 32, False), ("int", 8, 64, False), ("nf3", 3, 64, False), ("nf3", 3, -1, False)])
def test_pack_dequantize_equals_fake_quant(fmt, bits, group, sym):
    w = torch.randn(48, 192) * 0.02
    p = pack(w, fmt, bits, group, sym)
    assert torch.equal(p.dequantize(), fake_quantize(w, fmt, bits, group, sym,
                                                     scale_dtype=torch.float16))
    again = PackedTensor.from_tensors(p.tensors(), p.meta())
    assert torch.equal(again.dequantize(), p.dequantize())


def test_nbytes_measured_from_tensors():
    w = torch.randn(64, 128)
    p = pack(w, "int", 2, 64)
    # codes 64*128*2/8 = 2048 B, scales 64*2 fp16 = 256 B, zeros 128 codes * 2 bits = 32 B
    assert p.nbytes == 2048 + 256 + 32
    assert sum(t.numel() * t.element_size() for t in p.tensors().values()) == p.nbytes
    assert pack(w, "nf3", 3, 64).nbytes == 3072 + 256 + 256  # nf3 keeps fp16 max and |min|
