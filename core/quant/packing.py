"""Dense bit packing of integer codes (1..8 bits each) along the last dimension.

Layout: codes are taken k = lcm(bits, 8) / bits at a time; code i of a chunk occupies bits
[i*bits, (i+1)*bits) of a little-endian integer of lcm(bits, 8) / 8 bytes. So 4-bit puts the first code in
the low nibble, 2-bit four codes per byte, 3-bit eight codes in three bytes, 8-bit is stored as-is.
A row of n codes packs into ceil(n / k) * lcm / 8 bytes (the last chunk is zero-padded), so every row of a
2-D tensor starts on a byte boundary.
"""
from __future__ import annotations

import math

import torch


def _layout(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    lcm = math.lcm(bits, 8)
    return lcm // bits, lcm // 8


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take (per row)."""
    k, nb = _layout(bits)
    return -(-numel // k) * nb


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2**bits) -> uint8 [..., packed_size(n, bits)]."""
    k, nb = _layout(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    *lead, n = codes.shape
    pad = -n % k
    if nb == 1:  # 1, 2, 4 bits: OR the codes of a byte together in uint8 (the same bytes as the general path)
        c = codes.to(torch.uint8)
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*lead, -1, k)
        out = c[..., 0].clone(memory_format=torch.contiguous_format)  # rows contiguous whatever the codes' strides
        for i in range(1, k):
            out |= c[..., i] << (i * bits)
        return out
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, k)
    shifts = torch.arange(k, device=c.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # fields don't overlap, so sum == OR; at most 56 bits
    byte_shifts = torch.arange(nb, device=c.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., packed_size(numel, bits)] -> uint8 codes [..., numel]."""
    k, nb = _layout(bits)
    if bits == 8:
        return packed[..., :numel]
    *lead, _ = packed.shape
    mask = (1 << bits) - 1
    if nb == 1:  # 1, 2, 4 bits: codes never straddle bytes, so shift uint8 directly (hot path)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*lead, -1)[..., :numel]
    wide = torch.int32 if nb * 8 <= 31 else torch.int64
    b = packed.to(wide).reshape(*lead, -1, nb)
    word = (b << (torch.arange(nb, device=b.device, dtype=wide) * 8)).sum(-1, keepdim=True, dtype=wide)
    codes = (word >> (torch.arange(k, device=b.device, dtype=wide) * bits)) & mask
    return codes.reshape(*lead, -1)[..., :numel].to(torch.uint8)
