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


def _word_dtype(bits: int) -> torch.dtype:
    """int32 when a group's word fits in 31 bits (2, 3, 4, 6, 8 bits), else int64 (5, 7 bits)."""
    return torch.int32 if _group(bits)[1] * 8 <= 31 else torch.int64


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits occupy."""
    codes_per_group, bytes_per_group = _group(bits)
    return -(-numel // codes_per_group) * bytes_per_group


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) (any shape, any integer dtype) into a flat uint8 tensor."""
    codes_per_group, bytes_per_group = _group(bits)
    word_dtype = _word_dtype(bits)
    flat = codes.reshape(-1).to(word_dtype)
    pad = -flat.numel() % codes_per_group
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(-1, codes_per_group)
    shifts = torch.arange(codes_per_group, device=codes.device, dtype=word_dtype) * bits
    word = (groups << shifts).sum(dim=1, dtype=word_dtype)
    byte_shifts = torch.arange(bytes_per_group, device=codes.device, dtype=word_dtype) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat int32 (or int64) tensor."""
    codes_per_group, bytes_per_group = _group(bits)
    word_dtype = _word_dtype(bits)
    groups = packed.view(-1, bytes_per_group).to(word_dtype)
    byte_shifts = torch.arange(bytes_per_group, device=packed.device, dtype=word_dtype) * 8
    word = (groups << byte_shifts).sum(dim=1, dtype=word_dtype)
    shifts = torch.arange(codes_per_group, device=packed.device, dtype=word_dtype) * bits
    codes = (word[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel]
