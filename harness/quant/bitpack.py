"""Dense bit packing of unsigned integer codes into bytes (after hqq's ``core/bitpack.py``).

Layout: one little-endian bitstream. Code ``i`` occupies stream bits ``[i*b, (i+1)*b)`` and
stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. Widths that divide 8 never straddle a
byte; 3-, 5-, 6- and 7-bit codes do, and nothing is padded per byte, so a packed tensor holds
exactly ``ceil(numel * bits / 8)`` bytes (what the memory metrics measure).

Why 8-code blocks: 8 codes of ``b`` bits fill exactly ``b`` bytes, so each block is one
integer of at most 56 bits (int64 is enough for b <= 7; b = 8 is a plain copy). The work is
vectorised over blocks; a Python loop only walks chunks of ``_CHUNK`` codes to bound the
temporary int64 memory (8 bytes per code) on 7B-sized matrices.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 22  # codes per chunk, a multiple of 8: ~32 MB of int64 temporaries


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed: ``ceil(numel*bits/8)``."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _pack_chunk(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes``: 1-D uint8 with a length that is a multiple of 8 -> ``len*bits/8`` bytes."""
    blocks = codes.view(-1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    value = (blocks << shifts).sum(1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((value >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_chunk(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``packed``: 1-D uint8 with a length that is a multiple of ``bits`` -> 8 codes per block."""
    blocks = packed.view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    value = (blocks << byte_shifts).sum(1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((value >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs unsigned codes densely into bytes.

    Args:
        codes: integer tensor of any shape with values in ``[0, 2**bits)``; flattened in
            row-major order.
        bits: code width, 1..8.

    Returns:
        1-D uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes on ``codes``' device.

    Raises:
        ValueError: ``bits`` outside 1..8, or a code that does not fit in ``bits`` bits
            (it would otherwise be silently truncated).
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got "
                         f"range [{int(flat.min())}, {int(flat.max())}]")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    parts = [_pack_chunk(flat[i:i + _CHUNK], bits) for i in range(0, flat.numel(), _CHUNK)]
    out = torch.cat(parts) if parts else flat.new_zeros(0)
    return out[: packed_nbytes(n, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: 1-D uint8 bytes produced by :func:`pack_bits`.
        bits: the code width they were packed with, 1..8.
        numel: how many codes to read back.

    Returns:
        1-D uint8 tensor of ``numel`` codes on ``packed``'s device.

    Raises:
        ValueError: ``bits`` outside 1..8, or ``packed`` too short to hold ``numel`` codes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    need = packed_nbytes(numel, bits)
    if packed.numel() < need:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits "
                         f"(need {need})")
    if bits == 8:
        return packed[:numel].clone()
    data = packed[:need]
    pad = (-need) % bits  # complete the last 8-code block
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    chunk = _CHUNK // 8 * bits  # bytes per chunk: a whole number of blocks
    parts = [_unpack_chunk(data[i:i + chunk], bits) for i in range(0, data.numel(), chunk)]
    out = torch.cat(parts) if parts else data.new_zeros(0)
    return out[:numel].clone()
