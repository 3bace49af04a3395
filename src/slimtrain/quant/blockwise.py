"""Block-wise quantizers for flat tensors: absmax + codebook (signed or unsigned) and logarithmic.

A tensor of ``numel`` elements is viewed as ``ceil(numel / block_size)`` blocks of exactly
``block_size`` elements; the last block is padded with zeros that never influence its scale and
are dropped on decode. Codes are bit-packed (see :mod:`slimtrain.quant.packing`).

Rounding is nearest when ``seed`` is None, otherwise stochastic with noise
``uniform_noise(numel_padded, seed, start=noise_start)`` (draw the seed from a ``torch.Generator`` with
:func:`slimtrain.quant.rounding.draw_seed`).
"""

from __future__ import annotations

import torch

from slimtrain.quant.codebooks import codebook
from slimtrain.quant.elementary import exp2, log2
from slimtrain.quant.packing import pack, unpack
from slimtrain.quant.rounding import round_stochastic, round_to_codebook, uniform_noise

QUANTILE_BISECTION_STEPS = 8
_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
_LARGEST = torch.finfo(torch.float32).max
_SUBNORMAL_BOOST = 2.0**24  # lifts any subnormal float32 into the normal range, exactly


def block_count(numel: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` that cover ``numel`` elements (the last may be partial)."""
    return -(-numel // block_size)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` (any shape) as float32 blocks ``(block_count, block_size)``, tail padded with zeros."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def _noise_like(blocks: torch.Tensor, seed: int | None, start: int | torch.Tensor) -> torch.Tensor | None:
    if seed is None:
        return None
    return uniform_noise(blocks.numel(), seed, blocks.device, start).view_as(blocks)


def quantize_absmax(
    x: torch.Tensor, bits: int, kind: str = "dynamic", signed: bool = True,
    block_size: int = 128, seed: int | None = None, noise_start: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one absmax scale per block onto a ``kind`` codebook.

    Returns (codes: uint8 packed, ``bits`` per padded element; scales: float32 ``(blocks,)``).
    """
    blocks = to_blocks(x, block_size)
    scales = blocks.abs().amax(dim=1)
    # one division a block; a block whose absmax is subnormal is first scaled by 2^24 (exact), so
    # that the reciprocal stays finite (else 0 * inf = NaN for its zeros)
    column = scales[:, None]
    boost = torch.where(column < _TINY, _SUBNORMAL_BOOST, 1.0)
    normalized = (blocks * boost) * (1.0 / torch.where(column > 0, column * boost, 1.0))
    levels = codebook(kind, bits, signed, blocks.device)
    codes = round_to_codebook(normalized, levels, _noise_like(blocks, seed, noise_start))
    return pack(codes, bits), scales


def _unpack_blocks(codes: torch.Tensor, bits: int, count: int, block_size: int) -> torch.Tensor:
    return unpack(codes, bits, count * block_size).view(count, block_size)


def dequantize_absmax(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, numel: int, block_size: int = 128,
    kind: str = "dynamic", signed: bool = True,
) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax`: a flat float32 tensor of ``numel`` elements."""
    indices = _unpack_blocks(codes, bits, scales.numel(), block_size)
    levels = codebook(kind, bits, signed, codes.device)
    return (levels[indices] * scales[:, None]).reshape(-1)[:numel]


def _valid_counts(numel: int, blocks: torch.Tensor) -> torch.Tensor:
    """Real (unpadded) elements per block, ``(blocks,)`` int64."""
    count, size = blocks.shape
    valid = torch.full((count,), size, dtype=torch.int64, device=blocks.device)
    valid[-1] = numel - (count - 1) * size
    return valid


def block_quantile(blocks: torch.Tensor, numel: int, quantile: float) -> torch.Tensor:
    """Lower anchor x_p of each block of non-negative values, ``(blocks,)`` float32.

    x_p is the p-quantile (the ceil(p * n)-th smallest of the block's n real elements), found by
    bisection in log2 between the smallest positive element and the max, to within
    2^-QUANTILE_BISECTION_STEPS of that log range. x_p is always an element of the block and
    never below the true quantile. Where
    the quantile is 0 (more than a fraction p of the block is exactly zero) x_p is the smallest
    positive element; an all-zero block gets x_p = 0.
    """
    valid = _valid_counts(numel, blocks)
    # pads are zeros; counts are float32 because 64-bit integer sums vectorize poorly
    rank = (torch.ceil(quantile * valid).clamp(min=1) + (blocks.shape[1] - valid)).float()
    log_x = log2(blocks)  # -inf for zeros
    high = log_x.amax(dim=1)
    smallest_positive = torch.where(blocks > 0, blocks, torch.inf).amin(dim=1)
    low = torch.where(torch.isfinite(smallest_positive), log2(smallest_positive), high)
    for _ in range(QUANTILE_BISECTION_STEPS):
        mid = (low + high) / 2
        enough = (log_x <= mid[:, None]).float().sum(dim=1) >= rank
        high = torch.where(enough, mid, high)
        low = torch.where(enough, low, mid)
    # snap to the largest element not above 2^high: a real element of the block, >= the quantile
    snapped = torch.where(log_x <= high[:, None], blocks, 0.0).amax(dim=1)
    # a zero quantile is exact whatever the log range: the smallest positive element (0 if none)
    zero_quantile = (blocks == 0).float().sum(dim=1) >= rank
    exact_zero = torch.where(torch.isfinite(smallest_positive), smallest_positive, 0.0)
    return torch.where(zero_quantile, exact_zero, snapped)


def quantize_log(
    x: torch.Tensor, bits: int, block_size: int = 128, quantile: float = 0.1,
    seed: int | None = None, noise_start: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative ``x`` onto geometric levels per block (SOLO's unsigned quantizer).

    Block levels are max * alpha^k, k = 0 .. 2^bits - 1, alpha = (x_p / max)^(1 / (2^bits - 1)),
    with x_p from :func:`block_quantile`. There is no zero level: values below x_p (zeros
    included) take the lowest level. Rounding happens on the exponent k (stochastic rounding is
    unbiased in the log domain). Returns (codes: uint8 packed; scales: float32 ``(blocks, 2)``
    holding (max, x_p)).
    """
    blocks = to_blocks(x, block_size).clamp(max=_LARGEST)  # an overflowed +inf (e.g. a square) saturates
    numel = x.numel()
    top = blocks.amax(dim=1)
    bottom = block_quantile(blocks, numel, quantile)
    last = 2**bits - 1
    log_top, step = _log_levels(top, bottom, bits)
    levels_per_octave = torch.where(step > 0, 1.0 / step, 0.0)
    exponent = (log_top[:, None] - log2(blocks.clamp(min=_TINY))) * levels_per_octave[:, None]
    codes = round_stochastic(exponent, _noise_like(blocks, seed, noise_start)).clamp(0, last)
    return pack(codes.to(torch.uint8), bits), torch.stack([top, bottom], dim=1)


def _log_levels(top: torch.Tensor, bottom: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2 of the top level, log2 units per level) of log-map blocks with levels from ``top``
    down to ``bottom`` (float32, same shape; an all-zero block, top 0, gets (0, 0))."""
    positive = top > 0
    log_top = log2(torch.where(positive, top, 1.0))
    return log_top, (log_top - log2(torch.where(positive, bottom, 1.0))) / (2**bits - 1)


def dequantize_log(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, numel: int, block_size: int = 128
) -> torch.Tensor:
    """Inverse of :func:`quantize_log`: a flat float32 tensor of ``numel`` elements."""
    indices = _unpack_blocks(codes, bits, scales.shape[0], block_size).float()
    top, bottom = scales[:, 0:1], scales[:, 1:2]
    log_top, step = _log_levels(top, bottom, bits)
    values = exp2(log_top - step * indices)
    return torch.where(top > 0, values, 0.0).reshape(-1)[:numel]
