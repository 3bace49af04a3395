"""Number formats, rounding, codebooks and bit packing: pure functions on tensors."""

from slimtrain.quant.blockwise import (
    block_count,
    block_quantile,
    dequantize_absmax,
    dequantize_log,
    quantize_absmax,
    quantize_log,
    to_blocks,
)
from slimtrain.quant.codebooks import CODEBOOK_KINDS, codebook, median_spacing_radius
from slimtrain.quant.packing import pack, packed_numel, unpack
from slimtrain.quant.rounding import (
    ROUNDING_MODES,
    draw_seed,
    round_stochastic,
    round_to_codebook,
    uniform_noise,
)

__all__ = [
    "CODEBOOK_KINDS", "ROUNDING_MODES", "block_count", "block_quantile", "codebook",
    "dequantize_absmax", "dequantize_log", "draw_seed", "median_spacing_radius", "pack",
    "packed_numel", "quantize_absmax", "quantize_log", "round_stochastic", "round_to_codebook",
    "to_blocks", "uniform_noise", "unpack",
]
