"""Signed and unsigned codebooks (level maps) for block-wise absmax quantization.

A codebook is a sorted 1-D float32 tensor of ``2**bits`` levels in [-1, 1] (signed) or [0, 1]
(unsigned). A value normalized by its block's absmax is stored as the index of a level.
"""

from __future__ import annotations

import functools

import torch

CODEBOOK_BITS = (2, 3, 4, 5, 6, 7, 8)
CODEBOOK_KINDS = ("dynamic", "linear")


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is a supported code width."""
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"bits must be one of {CODEBOOK_BITS}, got {bits!r}")


def _dynamic_exponent_levels(bits: int, signed: bool) -> list[float]:
    """Levels of a dynamic-exponent map: decades 10^-(D-1) .. 10^0, finer fractions in larger decades.

    Decade i (i = 0 .. D-1, D = bits - 1) holds 2^(i + f) linearly spaced fractions in (0.1, 1],
    where f = 0 for a signed map (one bit is the sign) and f = 1 for an unsigned one. With 0 and +1
    this fills exactly 2^bits codes; the signed map has no -1 level (asymmetric, as is customary).
    """
    decades = bits - 1
    extra = 0 if signed else 1
    magnitudes: list[float] = []
    for i in range(decades):
        count = 2 ** (i + extra)
        width = 0.9 / count  # fractions: midpoints of ``count`` equal cells of [0.1, 1]
        magnitudes += [(0.1 + (j + 0.5) * width) * 10.0 ** (i - decades + 1) for j in range(count)]
    levels = magnitudes + [0.0, 1.0]
    if signed:
        levels += [-m for m in magnitudes]
    return levels


def _linear_levels(bits: int, signed: bool) -> list[float]:
    """Evenly spaced levels. Signed: 2^bits - 1 levels on [-1, 1] so that 0 is exact (the last
    code repeats +1 and is never chosen by rounding). Unsigned: 2^bits levels on [0, 1]."""
    n = 2**bits
    if signed:
        half = (n - 2) // 2
        return [i / half for i in range(-half, half + 1)] + [1.0]
    return [i / (n - 1) for i in range(n)]


@functools.cache
def _codebook_cpu(kind: str, bits: int, signed: bool) -> torch.Tensor:
    build = {"dynamic": _dynamic_exponent_levels, "linear": _linear_levels}[kind]
    levels = torch.tensor(sorted(build(bits, signed)), dtype=torch.float32)
    if levels.numel() != 2**bits:
        raise AssertionError(f"{kind} codebook at {bits} bits has {levels.numel()} levels")
    return levels


def codebook(
    kind: str, bits: int, signed: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """The sorted ``(2**bits,)`` float32 level table of a ``"dynamic"`` or ``"linear"`` map."""
    if kind not in CODEBOOK_KINDS:
        raise ValueError(f"codebook kind must be one of {CODEBOOK_KINDS}, got {kind!r}")
    check_bits(bits)
    return _codebook_on(kind, bits, signed, torch.device(device or "cpu"))


@functools.cache
def _codebook_on(kind: str, bits: int, signed: bool, device: torch.device) -> torch.Tensor:
    """The table on ``device``, copied there once (not at every step)."""
    return _codebook_cpu(kind, bits, signed).to(device)


def median_spacing_radius(levels: torch.Tensor) -> float:
    """Median half-gap between neighbouring distinct levels: r_med(b) of the SOLO spec (unitless)."""
    distinct = torch.unique(levels.double())
    return float((distinct[1:] - distinct[:-1]).median() / 2)
