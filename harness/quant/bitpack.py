"""Dense bit packing of unsigned integer codes into bytes (hqq's bitpack, any width 1-8).

Codes are laid out as one little-endian bitstream: code i occupies bits [i*b, (i+1)*b). Widths
that divide 8 never straddle a byte; 3-, 5-, 6- and 7-bit codes do, and the stream handles it
without padding per byte, so measured bytes are ceil(n*b/8).
"""

from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs ``codes`` (values < 2**bits) into a 1-D uint8 tensor of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    # Expand every code into its bits (LSB first), then regroup the stream by 8.
    shifts = torch.arange(bits, device=flat.device, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    nbytes = packed_nbytes(n, bits)
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32))
    return (stream.view(nbytes, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    if bits == 8:
        return packed[:numel].clone()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (stream.view(numel, bits).to(torch.int32) * weights).sum(1).to(torch.uint8)
