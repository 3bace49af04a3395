"""Bit packing of integer codes into uint8 storage: ``bits`` in 1..8, any number of codes.

Codes are grouped so that a group fills whole bytes: 8 codes of 3 bits take 3 bytes, 2 codes of
4 bits take 1 byte. A trailing partial group is padded with zero codes.
"""

from __future__ import annotations

import math

import torch


def _group(bits: int) -> tuple[int, int]:
    """(codes per group, bytes per group) for a code width."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits!r}")
    common = math.gcd(bits, 8)
    return 8 // common, bits // common


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits occupy."""
    codes_per_group, bytes_per_group = _group(bits)
    return -(-numel // codes_per_group) * bytes_per_group


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) (any shape, any integer dtype) into a flat uint8 tensor."""
    codes_per_group, bytes_per_group = _group(bits)
    flat = codes.reshape(-1).to(torch.int64)
    pad = -flat.numel() % codes_per_group
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(-1, codes_per_group)
    shifts = torch.arange(codes_per_group, device=codes.device, dtype=torch.int64) * bits
    word = (groups << shifts).sum(dim=1)  # at most 56 bits used
    byte_shifts = torch.arange(bytes_per_group, device=codes.device, dtype=torch.int64) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat int64 tensor."""
    codes_per_group, bytes_per_group = _group(bits)
    groups = packed.view(-1, bytes_per_group).to(torch.int64)
    byte_shifts = torch.arange(bytes_per_group, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(codes_per_group, device=packed.device, dtype=torch.int64) * bits
    codes = (word[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].long()
