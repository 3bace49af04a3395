"""Weight number formats: FP8 (E4M3, E5M2), INT8, INT4 (two codes per byte) and BF16, with
absmax scales per tensor, per output row or per group, and nearest or stochastic rounding.

A 2-D weight (rows, cols) is stored as ``codes`` (float8 / int8 / packed uint8 / bfloat16) and
``scales`` (float32: (1,) per tensor, (rows,) per row, (rows, cols // group) per group; empty for
bf16). Stochastic rounding takes a seed, as in :mod:`slimtrain.quant.blockwise`.
"""

from __future__ import annotations

import torch

from slimtrain.quant.packing import pack, packed_numel, unpack
from slimtrain.quant.rounding import round_stochastic, uniform_noise

WEIGHT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "int8", "int4", "bf16")
GRANULARITIES = ("tensor", "row", "group")
GROUP_SIZES = (32, 64, 128)

_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_INT_MAX = {"int8": 127, "int4": 7}


def format_max(fmt: str) -> float:
    """Largest representable magnitude of a format's codes (the value absmax scales map to)."""
    if fmt in _FLOAT8:
        return float(torch.finfo(_FLOAT8[fmt]).max)
    return float(_INT_MAX.get(fmt, 1))


def _scales(w: torch.Tensor, fmt: str, granularity: str, group_size: int) -> torch.Tensor:
    absmax = {
        "tensor": lambda: w.abs().amax().reshape(1),
        "row": lambda: w.abs().amax(dim=1),
        "group": lambda: w.reshape(w.shape[0], -1, group_size).abs().amax(dim=2),
    }[granularity]()
    return absmax / format_max(fmt)


def _expand(scales: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """Scales shaped to broadcast against the weight's (rows, cols)."""
    if granularity == "tensor":
        return scales.reshape(1, 1)
    if granularity == "row":
        return scales[:, None]
    return scales.repeat_interleave(group_size, dim=1)


def _float8_stochastic(y: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """Round float32 ``y`` (within the format's range) to one of its two float8 neighbours,
    unbiased: the nearest code, then its neighbour on the other side of y by one unit in the
    last place, chosen with probability proportional to closeness."""
    nearest = y.to(dtype)
    near = nearest.float()
    bits = nearest.view(torch.uint8).to(torch.int32)
    magnitude, sign = bits & 0x7F, bits & 0x80
    away = (near.abs() < y.abs()) | (near == 0)  # the other neighbour is farther from zero
    other_magnitude = torch.where(away, magnitude + 1, magnitude - 1).clamp(0, 0x7F)
    other = (other_magnitude | sign).to(torch.uint8).view(dtype).float()
    other = torch.where(torch.isfinite(other) & (other.abs() <= torch.finfo(dtype).max), other, near)
    gap = (other - near).abs()
    p_other = torch.where(gap > 0, (y - near).abs() / torch.where(gap > 0, gap, 1.0), 0.0)
    return torch.where(noise.view_as(y) < p_other, other, near).to(dtype)


def quantize_weight(
    w: torch.Tensor, fmt: str, granularity: str = "row", group_size: int = 128, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight. Returns (codes, scales); see the module docstring."""
    w = w.float()
    noise = None if seed is None else uniform_noise(w.numel(), seed, w.device).view_as(w)
    if fmt == "bf16":
        if noise is None:
            return w.to(torch.bfloat16), w.new_empty(0)
        return _bfloat16_stochastic(w, noise), w.new_empty(0)
    scales = _scales(w, fmt, granularity, group_size)
    expanded = _expand(scales, granularity, group_size)
    y = w / torch.where(expanded > 0, expanded, 1.0)
    if fmt in _FLOAT8:
        limit = format_max(fmt)
        y = y.clamp(-limit, limit)
        codes = y.to(_FLOAT8[fmt]) if noise is None else _float8_stochastic(y, _FLOAT8[fmt], noise)
        return codes, scales
    limit = _INT_MAX[fmt]
    ints = round_stochastic(y, noise).clamp(-limit, limit)
    if fmt == "int8":
        return ints.to(torch.int8), scales
    return pack((ints + 8).to(torch.int32), 4), scales  # int4: offset codes, two per byte


def _bfloat16_stochastic(w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of float32 to bfloat16: add uniform noise below the kept 16 bits, truncate."""
    bits = w.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    noisy = (bits + (noise * 65536).to(torch.int64)) & 0xFFFF0000
    rounded = torch.where(torch.isfinite(w), noisy, bits & 0xFFFF0000)
    return (rounded - ((rounded >> 31) << 32)).to(torch.int32).view(torch.float32).to(torch.bfloat16)


def dequantize_weight(
    codes: torch.Tensor, scales: torch.Tensor, fmt: str, shape: torch.Size,
    granularity: str = "row", group_size: int = 128,
) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: the float32 weight of ``shape`` (rows, cols)."""
    if fmt == "bf16":
        return codes.float()
    values = (unpack(codes, 4, shape.numel()).view(shape) - 8) if fmt == "int4" else codes
    return values.float() * _expand(scales, granularity, group_size)


def weight_storage_bytes(fmt: str, granularity: str, group_size: int, rows: int, cols: int) -> int:
    """Bytes that :func:`quantize_weight` stores for a (rows, cols) weight: codes plus float32 scales."""
    numel = rows * cols
    if fmt == "bf16":
        return 2 * numel
    codes = packed_numel(numel, 4) if fmt == "int4" else numel
    scales = {"tensor": 1, "row": rows, "group": rows * (cols // group_size)}[granularity]
    return codes + 4 * scales
