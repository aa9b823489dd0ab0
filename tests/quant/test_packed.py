import pytest
import torch

from harness.errors import HarnessError
from harness.quant import fake_quantize, pack
from harness.quant.formats import packed_from_tensors

# Every format the harness offers: integer 1-8 bits asymmetric, 2-8 symmetric, NF3; group sizes
# of several widths (packed rows then start mid-byte for odd bit widths) and per row.
FORMATS = [("int", b, s) for b in range(1, 9) for s in (False, True) if (b, s) != (1, True)]
FORMATS += [("nf3", 3, False)]


@pytest.mark.parametrize("group", [16, 64, -1])
@pytest.mark.parametrize("fmt,bits,sym", FORMATS)
def test_pack_dequantize_equals_fake_quant(fmt, bits, group, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 192) * 0.02
    p = pack(w, fmt, bits, group, sym)
    assert torch.equal(p.dequantize(), fake_quantize(w, fmt, bits, group, sym,
                                                     scale_dtype=torch.float16))
    again = packed_from_tensors(p.tensors(), p.meta())  # the format rebuilt from the metadata
    assert torch.equal(again.dequantize(), p.dequantize())


def test_symmetric_one_bit_is_refused():
    # Its grid would be {-1, 0, 1} (or {-1, 0}): not one bit. Packing it at 1 bit once flipped
    # the largest weights' signs.
    with pytest.raises(HarnessError, match="symmetric 1-bit"):
        pack(torch.randn(4, 32), "int", 1, 32, symmetric=True)


def test_nbytes_measured_from_tensors():
    w = torch.randn(64, 128)
    p = pack(w, "int", 2, 64)
    # codes 64*128*2/8 = 2048 B, scales 64*2 fp16 = 256 B, zeros 128 codes * 2 bits = 32 B
    assert p.nbytes == 2048 + 256 + 32
    assert sum(t.numel() * t.element_size() for t in p.tensors().values()) == p.nbytes
    assert pack(w, "nf3", 3, 64).nbytes == 3072 + 256 + 256  # nf3 keeps fp16 max and |min|
