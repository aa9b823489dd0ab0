import pytest
import torch

from harness.quant.bitpack import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_layout_is_lsb_first_stream():
    # 3-bit codes 5 (101), 3 (011), 7 (111): stream LSB-first = 1,0,1, 1,1,0, 1,1,1.
    packed = pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11011101, 0b1]


def test_dense_three_bit_size():
    assert pack_bits(torch.zeros(8, dtype=torch.uint8), 3).numel() == 3
