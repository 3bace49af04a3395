"""Optimizer state storage: one state tensor kept at 32, 16, 8, 4, 3 or 2 bits.

A state named ``name`` of a parameter lives in the optimizer's per-parameter dict as
- 32 bits: ``state[name]``, float32, the parameter's shape;
- 16 bits: ``state[name]``, bfloat16, the parameter's shape;
- 8/4/3/2 bits: ``state[name + "_codes"]`` (uint8, bit-packed codes) and ``state[name + "_scales"]``
  (float32: one absmax per block for the dynamic and linear maps, (max, x_p) per block for the
  logarithmic map).
All are plain tensors, so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from slimtrain.quant import (
    CODEBOOK_KINDS,
    block_count,
    codebook,
    dequantize_absmax,
    dequantize_log,
    median_spacing_radius,
    packed_numel,
    quantize_absmax,
    quantize_log,
)

STATE_BITS = (32, 16, 8, 4, 3, 2)
SIGNED_MAPS = CODEBOOK_KINDS  # ("dynamic", "linear")
UNSIGNED_MAPS = ("log", *CODEBOOK_KINDS)


@dataclass(frozen=True)
class StateFormat:
    """How one state tensor is stored.

    bits: 32, 16, 8, 4, 3 or 2. signed: whether the state can be negative (m) or not (v).
    kind: the level map below 16 bits ("dynamic", "linear", or "log" for unsigned states).
    block_size: elements per scale. quantile: p of the logarithmic map's lower anchor.
    stochastic: stochastic rounding when encoding (needs a seed per write).
    """

    bits: int
    signed: bool
    kind: str = "dynamic"
    block_size: int = 128
    quantile: float = 0.1
    stochastic: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits <= 8


def layout(fmt: StateFormat, name: str, shape: torch.Size) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors (key -> (shape, dtype)) that hold state ``name`` of a parameter of ``shape``."""
    if fmt.bits == 32:
        return {name: (tuple(shape), torch.float32)}
    if fmt.bits == 16:
        return {name: (tuple(shape), torch.bfloat16)}
    blocks = block_count(shape.numel(), fmt.block_size)
    scales = (blocks, 2) if fmt.kind == "log" else (blocks,)
    return {
        name + "_codes": ((packed_numel(blocks * fmt.block_size, fmt.bits),), torch.uint8),
        name + "_scales": (scales, torch.float32),
    }


# elements per chunk of a step: on a CPU, chunks whose temporaries stay in cache; on a GPU, few
# large chunks (each chunk is a sequence of kernel launches)
CPU_CHUNK_TARGET, GPU_CHUNK_TARGET = 2**20, 2**24


def chunk_numel(block_size: int, device: torch.device | str = "cpu") -> int:
    """Elements per processing chunk on ``device``: a multiple of ``block_size`` (itself a
    multiple of 8) near the device's target, so that chunks cut whole blocks and whole bytes of
    packed codes."""
    target = CPU_CHUNK_TARGET if torch.device(device).type == "cpu" else GPU_CHUNK_TARGET
    return max(1, target // block_size) * block_size


def chunk_views(state: dict, name: str, fmt: StateFormat, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Views of the tensors of state ``name`` that cover parameter elements [start, stop).

    ``start`` must be a multiple of ``fmt.block_size`` (see :func:`chunk_numel`).
    """
    if not fmt.quantized:
        return {name: state[name].view(-1)[start:stop]}
    first, last = start // fmt.block_size, block_count(stop, fmt.block_size)
    code_start = start * fmt.bits // 8
    code_stop = code_start + packed_numel((last - first) * fmt.block_size, fmt.bits)
    return {
        name + "_codes": state[name + "_codes"][code_start:code_stop],
        name + "_scales": state[name + "_scales"][first:last],
    }


def init_state(state: dict, name: str, fmt: StateFormat, param: torch.Tensor) -> None:
    """Store state ``name`` = 0 (all-zero codes and scales decode to exactly 0 in every format)."""
    for key, (shape, dtype) in layout(fmt, name, param.shape).items():
        state[key] = torch.zeros(shape, dtype=dtype, device=param.device)


def read_state(state: dict, name: str, fmt: StateFormat, param: torch.Tensor) -> torch.Tensor:
    """State ``name`` as float32 in the parameter's shape.

    At 32 bits this is the stored tensor itself (update it in place); otherwise a decoded copy
    that must be written back with :func:`write_state`.
    """
    if fmt.bits == 32:
        return state[name]
    if fmt.bits == 16:
        return state[name].float()
    codes, scales = state[name + "_codes"], state[name + "_scales"]
    numel = param.numel()
    if fmt.kind == "log":
        flat = dequantize_log(codes, scales, fmt.bits, numel, fmt.block_size)
    else:
        flat = dequantize_absmax(codes, scales, fmt.bits, numel, fmt.block_size, fmt.kind, fmt.signed)
    return flat.view(param.shape)


def write_state(
    state: dict, name: str, fmt: StateFormat, value: torch.Tensor, seed: int | None = None,
    noise_start: int | torch.Tensor = 0,
) -> None:
    """Encode float32 ``value`` into state ``name``. ``seed`` drives stochastic rounding; a chunk
    starting at element ``noise_start`` of its tensor takes the noise from there on."""
    if fmt.bits == 32:
        if value is not state[name]:
            state[name].copy_(value)
        return
    if fmt.bits == 16:
        state[name].copy_(value)
        return
    seed = seed if fmt.stochastic else None
    if fmt.kind == "log":
        codes, scales = quantize_log(value, fmt.bits, fmt.block_size, fmt.quantile, seed, noise_start)
    else:
        codes, scales = quantize_absmax(value, fmt.bits, fmt.kind, fmt.signed, fmt.block_size, seed,
                                        noise_start)
    state[name + "_codes"].copy_(codes)
    state[name + "_scales"].copy_(scales)


@functools.cache
def scaled_beta(beta: float, bits: int, reference_bits: int, kind: str = "dynamic") -> float:
    """SOLO's precision-specific momentum: the beta' whose quantization noise at ``bits`` equals
    that of ``beta`` at ``reference_bits``: beta'/(1-beta') * r(bits) = beta/(1-beta) * r(ref),
    with r the median spacing radius of the ``kind`` signed map. Never raises beta."""
    if bits >= reference_bits or beta <= 0.0:
        return beta
    ratio = median_spacing_radius(codebook(kind, reference_bits, True)) / median_spacing_radius(
        codebook(kind, bits, True)
    )
    c = beta / (1.0 - beta) * ratio
    return c / (1.0 + c)
