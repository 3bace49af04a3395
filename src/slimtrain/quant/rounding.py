"""Rounding: counter-based uniform noise, stochastic rounding and rounding onto codebooks.

Stochastic rounding (SR) is driven by an explicit ``torch.Generator``: each call draws one 31-bit
seed from it (:func:`draw_seed`) and the per-element noise is a hash of (seed, element index)
(:func:`uniform_noise`). The noise is therefore reproducible from the generator state alone,
identical on every device, and computable inside a fused kernel.
"""

from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "stochastic")

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd multiplier of a well-mixing 32-bit integer hash


def draw_seed(generator: torch.Generator | None) -> int:
    """One seed in [0, 2^31) from ``generator`` (the global CPU generator when None)."""
    return int(torch.randint(0, 2**31 - 1, (), generator=generator, device="cpu"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche (xor-shift-multiply, twice) on int64 holding values in [0, 2^32).

    The multiplier is below 2^27, so no product overflows int64: eager and compiled code give
    the same bits (wrapping int32 arithmetic is undefined in the C++ that torch.compile emits).
    """
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def _stream_key(seed: torch.Tensor) -> torch.Tensor:
    """hash(seed) of an integer tensor, in [0, 2^32): where the noise stream of ``seed`` starts."""
    return _mix32(seed.to(torch.int64) & _MASK32)


def noise_key(seed: int) -> int:
    """hash(seed) as a Python int: the offset of the stream of ``seed`` (see :func:`uniform_noise`)."""
    return int(_stream_key(torch.tensor(seed)))


def uniform_noise(
    numel: int, seed: int | torch.Tensor, device: torch.device | str | None = None,
    start: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``(numel,)`` float32 noise in [0, 1) with 24 random bits per element, a pure function of seed:
    elements ``start .. start + numel - 1`` of the stream of ``seed``.

    Element i is hash(i + hash(seed)) in 32-bit arithmetic; different seeds give independent-looking
    streams. ``seed`` and ``start`` may be 0-d integer tensors (so that compiled callers do not
    specialize on them).
    """
    key = _stream_key((seed if torch.is_tensor(seed) else torch.tensor(seed)).to(device))
    index = torch.arange(numel, dtype=torch.int64, device=device) + start
    x = _mix32((index + key) & _MASK32)
    return (x >> 8).to(torch.float32) * (1.0 / 2**24)


SMALL_TABLE = 16  # tables up to this size are searched by comparing against every entry


def count_below(table: torch.Tensor, x: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
    """For sorted ``table`` (T,), the number of entries < x (<= x if ``inclusive``), int32 like x.

    Written as elementwise ops so that a compiled caller fuses it (``torch.bucketize`` is a
    separate, slower kernel on CPU): a sum of comparisons for small tables, else a branchless
    binary search of ceil(log2(T + 1)) steps.
    """
    def below(entry: torch.Tensor) -> torch.Tensor:
        return entry <= x if inclusive else entry < x

    if table.numel() <= SMALL_TABLE:  # float sums: 64-bit integer lanes vectorize poorly
        count = torch.zeros_like(x, dtype=torch.float32)
        for entry in table:
            count = count + below(entry).float()
        return count.to(torch.int32)
    size = 1 << table.numel().bit_length()  # a power of two > T
    padded = torch.cat([table, table.new_full((size - table.numel(),), torch.inf)])
    position = torch.zeros_like(x, dtype=torch.int32)
    step = size // 2
    while step:
        position = torch.where(below(padded[position + (step - 1)]), position + step, position)
        step //= 2
    return position


def round_stochastic(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Round float ``x`` to integers (as float): floor(x + noise), or floor(x + 1/2) when noise is
    None. With noise ~ U[0, 1) the result is unbiased: E[round_stochastic(x)] = x."""
    return torch.floor(x + (0.5 if noise is None else noise.view_as(x)))


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """The (T - 1,) midpoints of neighbouring entries of sorted float32 ``levels`` (T,): where
    rounding to the nearest level changes."""
    return (levels[1:] + levels[:-1]) / 2


def round_to_codebook(
    x: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (int32, same shape as ``x``) of ``levels`` (sorted ascending) for the values ``x``.

    Nearest level when ``noise`` is None; otherwise x lands on one of its two neighbours with
    probabilities that make the decoded value unbiased (values outside the range are clamped).
    """
    n = levels.numel()
    if noise is None:
        return count_below(midpoints(levels), x)
    low = (count_below(levels[1:-1], x, inclusive=True)).clamp(0, n - 2)
    low_level = levels[low]
    gap = levels[low + 1] - low_level
    frac = ((x - low_level) / torch.where(gap > 0, gap, 1.0)).clamp(0.0, 1.0)
    return low + (noise.view_as(x) < frac).to(torch.int32)
