"""Fused AdamW steps in Triton (CUDA) for SOLO states: m in 2- to 8-bit codebook codes (an absmax
scale per block) and v on 2- to 8-bit logarithmic levels, each rounded to nearest or
stochastically: of a float32 parameter (one program per GROUP blocks), and of a float8, int8 or
int4 weight updated without a master copy (ECO or naive; one program per whole rows and whole
blocks, new row or group scales included), which also takes float32 states.
Decode, update, encode in one pass; each block's reductions (absmax, maximum, the quantile
bisection) stay in registers.

Every operation mirrors, in order and in float32, the eager torch code of slimtrain.quant and
slimtrain.optim.functional (as the C kernel of adamw_cpu.c does): launched without fused
multiply-adds and with correctly rounded division and square root, the kernels give the eager
step's bits. Tests run them on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
Imported only where Triton is installed (CUDA builds of torch bring it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slimtrain.optim.kernels import FLOAT8_LAYOUTS, WEIGHT_KINDS, scale_group
from slimtrain.optim.state import StateFormat
from slimtrain.quant import elementary
from slimtrain.quant.blockwise import QUANTILE_BISECTION_STEPS, block_count
from slimtrain.quant.codebooks import codebook
from slimtrain.quant.formats import format_max
from slimtrain.quant.rounding import midpoints, noise_key
from slimtrain.weights.tensor import QuantizedWeight

GROUP = 8  # blocks per program
# constants of slimtrain.quant.elementary and blockwise, as the kernels see them
SQRT_HALF, TWO_OVER_LN2 = tl.constexpr(elementary.SQRT_HALF), tl.constexpr(elementary.TWO_OVER_LN2)
A0, A1, A2, A3, A4 = (tl.constexpr(c) for c in elementary.ATANH_SERIES)
E0, E1, E2, E3, E4, E5, E6, E7, E8 = (tl.constexpr(c) for c in elementary.EXP2_POLYNOMIAL)
TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
LARGEST = tl.constexpr(torch.finfo(torch.float32).max)
INF, NAN = tl.constexpr(float("inf")), tl.constexpr(float("nan"))


@triton.jit
def _series(m, e):
    """e + log2(m) for float32 m in [sqrt(1/2), sqrt(2)): elementary.log2's atanh series."""
    s = tl.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    series = s2 * 0.0 + A0
    series = series * s2 + A1
    series = series * s2 + A2
    series = series * s2 + A3
    series = series * s2 + A4
    return e.to(tl.float32) + (s * series) * TWO_OVER_LN2


@triton.jit
def _log2(x):
    """slimtrain.quant.elementary.log2 of float32 x: -inf at 0, +inf at +inf, NaN below 0."""
    subnormal = x < TINY
    b = tl.where(subnormal, x * 16777216.0, x).to(tl.int32, bitcast=True)
    e = ((b >> 23) & 0xFF) - 126 - tl.where(subnormal, 24, 0)
    m = ((b & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # in [0.5, 1)
    small = m < SQRT_HALF
    m = tl.where(small, m * 2.0, m)
    e = e - small.to(tl.int32)
    r = _series(m, e)
    r = tl.where(x == INF, x, r)
    return tl.where(x > 0.0, r, tl.where(x == 0.0, -INF, NAN))


@triton.jit
def _power_of_two(n):
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exp2(y):
    """slimtrain.quant.elementary.exp2 of float32 y: 0 below -252, +inf above 254."""
    clamped = tl.where(y < -252.0, -252.0, tl.where(y > 254.0, 254.0, y))
    n = tl.floor(clamped + 0.5)
    r = clamped - n
    poly = r * 0.0 + E0
    poly = poly * r + E1
    poly = poly * r + E2
    poly = poly * r + E3
    poly = poly * r + E4
    poly = poly * r + E5
    poly = poly * r + E6
    poly = poly * r + E7
    poly = poly * r + E8
    whole = tl.where(n == n, n, 0.0).to(tl.int32)
    half = whole >> 1  # floor(whole / 2)
    result = poly * _power_of_two(half) * _power_of_two(whole - half)
    result = tl.where(y < -252.0, 0.0, tl.where(y > 254.0, INF, result))
    return tl.where(y == y, result, y)


@triton.jit
def _mix32(x):
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _unpack(codes_ptr, index, mask, BITS: tl.constexpr):
    """The BITS-bit codes (int32) of padded elements ``index``, as packing.unpack reads them: each
    group of 8 codes in BITS bytes, low bits first."""
    first_bit = (index % 8) * BITS
    byte_index = (index // 8) * BITS + first_bit // 8
    word = tl.load(codes_ptr + byte_index, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # a code may go on into the next byte of its group
        straddles = mask & (first_bit % 8 + BITS > 8)
        word = word | (tl.load(codes_ptr + byte_index + 1, mask=straddles, other=0).to(tl.int32) << 8)
    return (word >> (first_bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def _pack_store(codes_ptr, codes, block, mask_blocks, byte_count, BITS: tl.constexpr, BLOCK: tl.constexpr,
                BLOCKS: tl.constexpr):
    """Store (BLOCKS, BLOCK) int32 codes of the blocks ``block`` packed as _unpack reads them, into
    the first ``byte_count`` bytes at codes_ptr."""
    if BITS == 8:
        index = block[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        tl.store(codes_ptr + index, codes.to(tl.uint8), mask=mask_blocks[:, None] & (index < byte_count))
    elif 8 % BITS == 0:  # whole codes per byte: one store
        PER: tl.constexpr = 8 // BITS
        shifts = (tl.arange(0, BLOCK) % PER) * BITS
        words = tl.reshape(codes << shifts[None, :], (BLOCKS, BLOCK // PER, PER))
        packed = tl.sum(words, axis=2)  # disjoint bits: the sum is the OR
        byte_index = block[:, None] * (BLOCK // PER) + tl.arange(0, BLOCK // PER)[None, :]
        mask = mask_blocks[:, None] & (byte_index < byte_count)
        tl.store(codes_ptr + byte_index, packed.to(tl.uint8), mask=mask)
    else:  # a group of 8 codes in a word of BITS bytes, stored byte by byte
        shifts = ((tl.arange(0, BLOCK) % 8) * BITS).to(tl.int64)
        words = tl.sum(tl.reshape(codes.to(tl.int64) << shifts[None, :], (BLOCKS, BLOCK // 8, 8)), axis=2)
        group = block[:, None] * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]
        for k in tl.static_range(BITS):
            byte_index = group * BITS + k
            mask = mask_blocks[:, None] & (byte_index < byte_count)
            tl.store(codes_ptr + byte_index, ((words >> (8 * k)) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _count_below(table_ptr, y, BITS: tl.constexpr, INCLUSIVE: tl.constexpr):
    """rounding.count_below of the 2^BITS - 1 sorted float32 entries at table_ptr for each of y
    (int32; 0 for NaN): a branchless binary search, one lookup per bit."""
    count = tl.zeros(y.shape, dtype=tl.int32)
    for i in tl.static_range(BITS):
        half: tl.constexpr = 1 << (BITS - 1 - i)
        entry = tl.load(table_ptr + count + (half - 1))
        below = (entry <= y) if INCLUSIVE else (entry < y)
        count = tl.where(below, count + half, count)
    return count


@triton.jit
def _decode_states(index, block, has_block, m_codes_ptr, m_scales_ptr, levels_ptr, v_codes_ptr,
                   v_scales_ptr, n_blocks, M_BITS: tl.constexpr, V_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """m = levels[code] * scale and v = exp2(log2(max) - step * code) (0 for an all-zero block) of
    the (blocks, BLOCK) padded elements ``index`` of blocks ``block``."""
    in_blocks = index < n_blocks * BLOCK
    m_scale = tl.load(m_scales_ptr + block, mask=has_block, other=0.0)
    m = tl.load(levels_ptr + _unpack(m_codes_ptr, index, in_blocks, M_BITS)) * m_scale[:, None]
    V_LAST: tl.constexpr = (1 << V_BITS) - 1
    top = tl.load(v_scales_ptr + 2 * block, mask=has_block, other=0.0)
    bottom = tl.load(v_scales_ptr + 2 * block + 1, mask=has_block, other=0.0)
    positive = top > 0.0
    log_top = _log2(tl.where(positive, top, 1.0))
    step = tl.div_rn(log_top - _log2(tl.where(positive, bottom, 1.0)), V_LAST * 1.0)
    k = _unpack(v_codes_ptr, index, in_blocks, V_BITS).to(tl.float32)
    v = tl.where(positive[:, None], _exp2(log_top[:, None] - step[:, None] * k), 0.0)
    return m, v


@triton.jit
def _adamw_update(p, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, eps, inverse_correction,
                  neg_step_size):
    """functional.adamw_update_(reproducible=True): the new p, m, v and this step's denominator."""
    m = m + (g - m) * lerp_weight
    v = v * beta2 + one_minus_beta2 * g * g
    denominator = tl.sqrt_rn(v) * inverse_correction + eps
    p = p * decay + tl.div_rn(neg_step_size * m, denominator)
    return p, m, v, denominator


@triton.jit
def _encode_states(m, v, index, block, has_block, real, numel, n_blocks, m_codes_ptr, m_scales_ptr,
                   levels_ptr, mids_ptr, v_codes_ptr, v_scales_ptr, quantile, m_key, v_key,
                   M_BITS: tl.constexpr, M_STOCHASTIC: tl.constexpr, V_BITS: tl.constexpr,
                   V_STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr,
                   STEPS: tl.constexpr):
    """Store m (quantize_absmax) and v (quantize_log) of the BLOCKS blocks ``block`` (those of
    ``has_block``), each rounded to nearest or stochastically; padding (not ``real``) encodes as
    zeros."""
    m = tl.where(real, m, 0.0)
    absmax = tl.max(tl.abs(m), axis=1)
    boost = tl.where(absmax < TINY, 16777216.0, 1.0)
    inverse = tl.div_rn(1.0, tl.where(absmax > 0.0, absmax * boost, 1.0))
    y = (m * boost[:, None]) * inverse[:, None]
    if M_STOCHASTIC:  # round_to_codebook with noise: up from level low with p = frac
        low = tl.minimum(_count_below(levels_ptr + 1, y, M_BITS, True), (1 << M_BITS) - 2)
        low_level = tl.load(levels_ptr + low)
        gap = tl.load(levels_ptr + low + 1) - low_level
        frac = tl.div_rn(y - low_level, tl.where(gap > 0.0, gap, 1.0))
        frac = tl.where(frac < 0.0, 0.0, tl.where(frac > 1.0, 1.0, frac))
        m_code = low + (_noise(index, m_key) < frac).to(tl.int32)
    else:  # the nearest level: the count of midpoints below y
        m_code = _count_below(mids_ptr, y, M_BITS, False)
    _pack_store(m_codes_ptr, m_code, block, has_block, n_blocks * BLOCK * M_BITS // 8, M_BITS,
                BLOCK, BLOCKS)
    tl.store(m_scales_ptr + block, absmax, mask=has_block)
    # v: x_p by bisection in log2, snapped to an element
    V_LAST: tl.constexpr = (1 << V_BITS) - 1
    x = tl.where(real, v, 0.0)
    x = tl.where(x > LARGEST, LARGEST, x)
    valid = tl.minimum(numel - block * BLOCK, BLOCK).to(tl.float32)
    rank = tl.maximum(tl.ceil(quantile * valid), 1.0) + (BLOCK - valid)
    log_x = _log2(x)
    v_top = tl.max(x, axis=1)
    high = tl.max(log_x, axis=1)
    smallest = tl.min(tl.where(x > 0.0, x, INF), axis=1)
    finite_smallest = smallest < INF
    low = tl.where(finite_smallest, _log2(smallest), high)
    for _ in tl.static_range(STEPS):
        middle = (low + high) / 2.0
        enough = tl.sum((log_x <= middle[:, None]).to(tl.float32), axis=1) >= rank
        high = tl.where(enough, middle, high)
        low = tl.where(enough, low, middle)
    snapped = tl.max(tl.where(log_x <= high[:, None], x, 0.0), axis=1)
    zero_quantile = tl.sum((x == 0.0).to(tl.float32), axis=1) >= rank
    v_bottom = tl.where(zero_quantile, tl.where(finite_smallest, smallest, 0.0), snapped)
    v_log_top = _log2(tl.where(v_top > 0.0, v_top, 1.0))
    v_step = tl.div_rn(v_log_top - _log2(tl.where(v_top > 0.0, v_bottom, 1.0)), V_LAST * 1.0)
    levels_per_octave = tl.where(v_step > 0.0, tl.div_rn(1.0, tl.where(v_step > 0.0, v_step, 1.0)), 0.0)
    # log2 of x clamped to the smallest normal: log2(TINY) = -126 exactly
    exponent = (v_log_top[:, None] - tl.where(x < TINY, -126.0, log_x)) * levels_per_octave[:, None]
    offset = _noise(index, v_key) if V_STOCHASTIC else 0.5
    v_code = tl.floor(exponent + offset)
    v_code = tl.where(v_code > 0.0, v_code, 0.0)  # NaN becomes 0, as in a uint8 conversion
    v_code = tl.where(v_code < V_LAST, v_code, V_LAST * 1.0)
    _pack_store(v_codes_ptr, v_code.to(tl.int32), block, has_block, n_blocks * BLOCK * V_BITS // 8, V_BITS,
                BLOCK, BLOCKS)
    tl.store(v_scales_ptr + 2 * block, v_top, mask=has_block)
    tl.store(v_scales_ptr + 2 * block + 1, v_bottom, mask=has_block)


@triton.jit
def _noise(index, key):
    """rounding.uniform_noise of the padded elements ``index`` under the stream key ``key``."""
    return (_mix32(index.to(tl.uint32) + key.to(tl.uint32)) >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit(do_not_specialize=["m_key", "v_key"])  # a key of 1 would otherwise become a constant
def _adamw_step_kernel(
    param_ptr, grad_ptr, m_codes_ptr, m_scales_ptr, levels_ptr, mids_ptr, v_codes_ptr, v_scales_ptr,
    numel, n_blocks, decay, lerp_weight, beta2, one_minus_beta2, eps, inverse_correction,
    neg_step_size, quantile, m_key, v_key,
    MAXIMIZE: tl.constexpr, M_BITS: tl.constexpr, M_STOCHASTIC: tl.constexpr, V_BITS: tl.constexpr,
    V_STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, STEPS: tl.constexpr,
):
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)  # (GROUP,)
    has_block = block < n_blocks
    index = block[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (GROUP, BLOCK) padded elements
    real = index < numel
    p = tl.load(param_ptr + index, mask=real, other=0.0)
    g = tl.load(grad_ptr + index, mask=real, other=0.0)
    if MAXIMIZE:
        g = -g
    m, v = _decode_states(index, block, has_block, m_codes_ptr, m_scales_ptr, levels_ptr, v_codes_ptr,
                          v_scales_ptr, n_blocks, M_BITS, V_BITS, BLOCK)
    p, m, v, _ = _adamw_update(p, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, eps,
                               inverse_correction, neg_step_size)
    tl.store(param_ptr + index, p, mask=real)
    _encode_states(m, v, index, block, has_block, real, numel, n_blocks, m_codes_ptr, m_scales_ptr,
                   levels_ptr, mids_ptr, v_codes_ptr, v_scales_ptr, quantile, m_key, v_key, M_BITS,
                   M_STOCHASTIC, V_BITS, V_STOCHASTIC, BLOCK, GROUP, STEPS)


@triton.jit
def _float8_decode(codes, MANTISSA: tl.constexpr, BIAS: tl.constexpr):
    """The float32 values of int32 float8 codes, as torch decodes every finite code: exponent and
    mantissa bits placed in a float32 (a float32 subnormal where the float8 is one), rescaled."""
    bits = ((codes & 0x7F) << (23 - MANTISSA)) | ((codes & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True) * (2.0 ** (127 - BIAS))


@triton.jit
def _float8_nearest(y, MANTISSA: tl.constexpr, BIAS: tl.constexpr):
    """The nearest float8 codes (int32) of float32 |y| <= the format's max, ties to even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(y)
    # multiples of the smallest subnormal (below 2^MANTISSA): adding 2^23 rounds them to nearest even
    units = (tl.minimum(a, 2.0 ** (1 - BIAS)) * (2.0 ** (BIAS - 1 + MANTISSA)) + 8388608.0) - 8388608.0
    SHIFT: tl.constexpr = 23 - MANTISSA
    b = a.to(tl.int32, bitcast=True)
    b = b + ((1 << SHIFT) >> 1) - 1 + ((b >> SHIFT) & 1)
    normal = (b >> SHIFT) - ((127 - BIAS) << MANTISSA)
    return sign | tl.where(a < 2.0 ** (1 - BIAS), units.to(tl.int32), normal)


@triton.jit
def _float8_stochastic(y, noise, MANTISSA: tl.constexpr, BIAS: tl.constexpr, FORMAT_MAX: tl.constexpr):
    """formats._float8_stochastic: the nearest code, or its neighbour on the other side of y with
    probability proportional to closeness (noise in [0, 1))."""
    nearest = _float8_nearest(y, MANTISSA, BIAS)
    near = _float8_decode(nearest, MANTISSA, BIAS)
    away = (tl.abs(near) < tl.abs(y)) | (near == 0.0)  # the other neighbour is farther from zero
    other_magnitude = (nearest & 0x7F) + tl.where(away, 1, -1)
    other_magnitude = tl.minimum(tl.maximum(other_magnitude, 0), 0x7F)
    other_code = other_magnitude | (nearest & 0x80)
    other = _float8_decode(other_code, MANTISSA, BIAS)
    usable = tl.abs(other) <= FORMAT_MAX  # finite and in range
    other_code = tl.where(usable, other_code, nearest)
    other = tl.where(usable, other, near)
    gap = tl.abs(other - near)
    p_other = tl.where(gap > 0.0, tl.div_rn(tl.abs(y - near), tl.where(gap > 0.0, gap, 1.0)), 0.0)
    return tl.where(noise < p_other, other_code, nearest)


@triton.jit(do_not_specialize=["m_key", "v_key", "weight_key"])
def _adamw_weight_kernel(
    codes_ptr, scales_ptr, grad_ptr, m_codes_ptr, m_scales_ptr, levels_ptr, mids_ptr, v_codes_ptr,
    v_scales_ptr, rows, cols, blocks_per_program, numel, n_blocks, decay, lerp_weight,
    beta2, one_minus_beta2, eps, inverse_correction, neg_step_size, quantile, m_key, v_key, weight_key,
    eco_scale,
    MAXIMIZE: tl.constexpr, M_BITS: tl.constexpr, M_STOCHASTIC: tl.constexpr, V_BITS: tl.constexpr,
    V_STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr, ROWS: tl.constexpr,
    SCALE_GROUP: tl.constexpr, STEPS: tl.constexpr, KIND: tl.constexpr, MANTISSA: tl.constexpr,
    BIAS: tl.constexpr, FORMAT_MAX: tl.constexpr, WEIGHT_STOCHASTIC: tl.constexpr, ECO: tl.constexpr,
    FLOAT_STATES: tl.constexpr,
):
    """The step of a weight of KIND codes (WEIGHT_FLOAT8 with MANTISSA and BIAS, WEIGHT_INT8, or
    WEIGHT_INT4: value + 8, two per byte) over ``blocks_per_program`` (at most BLOCKS) whole blocks
    that hold whole scale groups, without a master copy: decode, update, re-quantize with new
    absmax scales per group of SCALE_GROUP elements (a row or a group of it, dividing BLOCK) or,
    SCALE_GROUP 0, per row of the program's ROWS rows (rows that straddle blocks), nearest or
    stochastic, feed the rounding error into m (ECO) or drop it, encode m and v (FLOAT_STATES: m
    and v are float32 tensors at m_codes_ptr and v_codes_ptr, read and written as they are)."""
    block = tl.program_id(0) * blocks_per_program + tl.arange(0, BLOCKS)
    has_block = (tl.arange(0, BLOCKS) < blocks_per_program) & (block < n_blocks)
    index = block[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (BLOCKS, BLOCK)
    real = has_block[:, None] & (index < numel)
    group = cols if SCALE_GROUP == 0 else SCALE_GROUP
    scale = tl.load(scales_ptr + index // group, mask=real, other=0.0)
    if KIND == 0:
        unscaled = _float8_decode(tl.load(codes_ptr + index, mask=real, other=0).to(tl.int32), MANTISSA, BIAS)
    elif KIND == 1:
        unscaled = tl.load(codes_ptr + index, mask=real, other=0).to(tl.float32)
    else:
        unscaled = (_unpack(codes_ptr, index, real, 4) - 8).to(tl.float32)
    p = unscaled * scale
    g = tl.load(grad_ptr + index, mask=real, other=0.0)
    if MAXIMIZE:
        g = -g
    if FLOAT_STATES:
        m = tl.load(m_codes_ptr + index, mask=real, other=0.0)
        v = tl.load(v_codes_ptr + index, mask=real, other=0.0)
    else:
        m, v = _decode_states(index, block, has_block, m_codes_ptr, m_scales_ptr, levels_ptr, v_codes_ptr,
                              v_scales_ptr, n_blocks, M_BITS, V_BITS, BLOCK)
    x, m, v, denominator = _adamw_update(p, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, eps,
                                         inverse_correction, neg_step_size)
    # quantize_weight: absmax scales of the new values, per row or per group of a row
    magnitude = tl.where(real, tl.abs(x), 0.0)
    if SCALE_GROUP == 0:  # rows may straddle blocks: one masked maximum per row
        first_row = tl.program_id(0) * ROWS
        row_in_program = index // cols - first_row
        expanded = tl.zeros((BLOCKS, BLOCK), dtype=tl.float32)
        for r in tl.static_range(ROWS):
            in_row = row_in_program == r
            absmax = tl.max(tl.max(tl.where(in_row, magnitude, 0.0), axis=1), axis=0)
            new_scale = tl.div_rn(absmax, FORMAT_MAX)
            expanded = tl.where(in_row, new_scale, expanded)
            tl.store(scales_ptr + first_row + r, new_scale, mask=first_row + r < rows)
    else:  # groups lie within blocks
        PER_BLOCK: tl.constexpr = BLOCK // SCALE_GROUP
        GROUPS: tl.constexpr = BLOCKS * PER_BLOCK
        new_scale = tl.div_rn(tl.max(tl.reshape(magnitude, (GROUPS, SCALE_GROUP)), axis=1), FORMAT_MAX)
        expanded = tl.reshape(tl.broadcast_to(new_scale[:, None], (GROUPS, SCALE_GROUP)), (BLOCKS, BLOCK))
        group_index = tl.reshape(block[:, None] * PER_BLOCK + tl.arange(0, PER_BLOCK)[None, :], (GROUPS,))
        group_real = tl.reshape(tl.broadcast_to(has_block[:, None], (BLOCKS, PER_BLOCK)), (GROUPS,))
        tl.store(scales_ptr + group_index, new_scale, mask=group_real & (group_index < numel // SCALE_GROUP))
    y = tl.div_rn(x, tl.where(expanded > 0.0, expanded, 1.0))
    if KIND == 0:  # clamp, then round to float8
        y = tl.where(y > FORMAT_MAX, FORMAT_MAX, tl.where(y < -FORMAT_MAX, -FORMAT_MAX, y))
        if WEIGHT_STOCHASTIC:
            code = _float8_stochastic(y, _noise(index, weight_key), MANTISSA, BIAS, FORMAT_MAX)
        else:
            code = _float8_nearest(y, MANTISSA, BIAS)
        tl.store(codes_ptr + index, code.to(tl.uint8), mask=real)
        stored = _float8_decode(code, MANTISSA, BIAS)
    else:  # rounding.round_stochastic, then clamp
        stored = tl.floor(y + (_noise(index, weight_key) if WEIGHT_STOCHASTIC else 0.5))
        stored = tl.where(stored > FORMAT_MAX, FORMAT_MAX,
                          tl.where(stored < -FORMAT_MAX, -FORMAT_MAX, stored))
        if KIND == 1:
            tl.store(codes_ptr + index, stored.to(tl.int8), mask=real)
        else:
            _pack_store(codes_ptr, stored.to(tl.int32) + 8, block, has_block, (numel + 1) // 2, 4, BLOCK,
                        BLOCKS)
    if ECO:  # m += (eco_scale * denominator) * e, e = the new value less what was stored
        m = m + eco_scale * denominator * (x - stored * expanded)
    if FLOAT_STATES:
        tl.store(m_codes_ptr + index, m, mask=real)
        tl.store(v_codes_ptr + index, v, mask=real)
    else:
        _encode_states(m, v, index, block, has_block, real, numel, n_blocks, m_codes_ptr, m_scales_ptr,
                       levels_ptr, mids_ptr, v_codes_ptr, v_scales_ptr, quantile, m_key, v_key, M_BITS,
                       M_STOCHASTIC, V_BITS, V_STOCHASTIC, BLOCK, BLOCKS, STEPS)


def supported(m_format: StateFormat, v_format: StateFormat) -> bool:
    """Whether this kernel steps states stored in ``m_format`` and ``v_format``: m a 2- to 8-bit
    codebook, v on 2- to 8-bit logarithmic levels, each rounded to nearest or stochastically, one
    power-of-two block size of at least 8."""
    block_size = m_format.block_size
    return (m_format.quantized and m_format.kind != "log" and v_format.quantized and v_format.kind == "log"
            and v_format.block_size == block_size and block_size >= 8 and block_size & (block_size - 1) == 0)


_tables: dict = {}  # (kind, bits, signed, device) -> the codebook's levels and midpoints


def _levels_and_mids(fmt: StateFormat, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (fmt.kind, fmt.bits, fmt.signed, device)
    if key not in _tables:
        levels = codebook(fmt.kind, fmt.bits, fmt.signed, device)
        _tables[key] = (levels, midpoints(levels))
    return _tables[key]


def adamw_step(param: torch.Tensor, grad: torch.Tensor, state: dict, formats: dict[str, StateFormat],
               scalars: dict, seeds: dict[str, int | None], maximize: bool) -> None:
    """One AdamW step of a contiguous float32 ``param`` with ``grad`` (float32, same shape) and the
    states ``state["exp_avg_*"]``, ``state["exp_avg_sq_*"]`` stored in ``formats`` (see
    :func:`supported`); ``scalars`` as AdamW._scalars returns them, ``seeds`` the states' rounding
    seeds by name."""
    numel = param.numel()
    blocks = block_count(numel, formats["exp_avg"].block_size)
    tensors, scalar_values, constants = _launch_arguments(state, formats, scalars, seeds, param.device)
    _adamw_step_kernel[(triton.cdiv(blocks, GROUP),)](
        param, grad, *tensors, numel, blocks, *scalar_values, MAXIMIZE=maximize, GROUP=GROUP, **constants,
    )


def _scale_group(weight: QuantizedWeight, block_size: int) -> int:
    """The weight kernel's SCALE_GROUP: the elements that share a scale (a row or a group of it)
    where they divide a block, else 0 (rows that straddle blocks: one masked maximum per row)."""
    group = scale_group(weight.format, weight.shape[1])
    return group if block_size % group == 0 else 0


MOST_ROWS_PER_PROGRAM = 32  # each row of a program costs a masked maximum over the program's elements


def _program_layout(shape: torch.Size, block_size: int) -> tuple[int, int]:
    """(blocks, rows) per program for a (rows, cols) weight: whole units of lcm(cols, block_size)
    elements (whole rows and whole blocks), about GROUP blocks."""
    unit = math.lcm(shape[1], block_size)
    units = max(1, GROUP // (unit // block_size))
    return units * unit // block_size, units * unit // shape[1]


def _float_states(m_format: StateFormat, v_format: StateFormat) -> bool:
    return m_format.bits == v_format.bits == 32


def weight_supported(weight: QuantizedWeight, m_format: StateFormat, v_format: StateFormat) -> bool:
    """Whether the weight kernel steps ``weight``: float8, int8 or int4 codes (int4: an even number
    of columns) with row scales (at most MOST_ROWS_PER_PROGRAM rows per program), or group scales
    whose groups divide a block; float32 states, or states that :func:`supported` covers."""
    block_size = m_format.block_size
    return (weight.format.fmt in WEIGHT_KINDS and weight.format.granularity in ("row", "group")
            and (weight.format.fmt != "int4" or weight.shape[1] % 2 == 0)
            and (_scale_group(weight, block_size) > 0 or (
                weight.format.granularity == "row"
                and _program_layout(weight.shape, block_size)[1] <= MOST_ROWS_PER_PROGRAM))
            and (_float_states(m_format, v_format) or supported(m_format, v_format)))


def _key(seed: int | None) -> int:
    """The kernels' noise key of a rounding seed (0 where there is none: rounded to nearest)."""
    return 0 if seed is None else noise_key(seed)


def _launch_arguments(state: dict, formats: dict[str, StateFormat], scalars: dict,
                      seeds: dict[str, int | None], device: torch.device) -> tuple[list, list, dict]:
    """What both kernels take: the states' tensors (float32 states: m, v and m again where the
    kernels take no tensor), the scalars, the constants."""
    m_format, v_format = formats["exp_avg"], formats["exp_avg_sq"]
    # a state is rounded stochastically where it has a seed (AdamW draws them for those only)
    m_seed, v_seed = seeds["exp_avg"], seeds["exp_avg_sq"]
    if _float_states(m_format, v_format):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        tensors = [m, m, m, m, v, m]
    else:
        levels, mids = _levels_and_mids(m_format, device)
        tensors = [
            state["exp_avg_codes"], state["exp_avg_scales"], levels, mids, state["exp_avg_sq_codes"],
            state["exp_avg_sq_scales"],
        ]
    scalar_values = [
        scalars["decay"], 1 - scalars["beta1"], scalars["beta2"], 1 - scalars["beta2"], scalars["eps"],
        1 / scalars["bias_correction2_sqrt"], -scalars["step_size"], v_format.quantile, _key(m_seed),
        _key(v_seed),
    ]
    constants = dict(M_BITS=m_format.bits, M_STOCHASTIC=m_seed is not None, V_BITS=v_format.bits,
                     V_STOCHASTIC=v_seed is not None, BLOCK=m_format.block_size,
                     STEPS=QUANTILE_BISECTION_STEPS, enable_fp_fusion=False)
    return tensors, scalar_values, constants


def adamw_weight_step(weight: QuantizedWeight, grad: torch.Tensor, state: dict,
                      formats: dict[str, StateFormat], scalars: dict, seeds: dict[str, int | None],
                      weight_seed: int | None, eco: bool, maximize: bool) -> None:
    """One AdamW step of a QuantizedWeight (see :func:`weight_supported`) updated without a master
    copy: ECO (``eco``) or naive; stochastic rounding where ``weight_seed`` is given."""
    fmt = weight.format.fmt
    mantissa, bias = FLOAT8_LAYOUTS.get(fmt, (0, 0))
    block_size = formats["exp_avg"].block_size
    rows, cols = weight.shape
    blocks_per_program, rows_per_program = _program_layout(weight.shape, block_size)
    scale_layout = _scale_group(weight, block_size)
    numel = weight.numel()
    blocks = block_count(numel, block_size)
    tensors, scalar_values, constants = _launch_arguments(state, formats, scalars, seeds, weight.device)
    codes = weight.codes.view(torch.uint8) if fmt in FLOAT8_LAYOUTS else weight.codes  # int8, packed int4
    _adamw_weight_kernel[(triton.cdiv(blocks, blocks_per_program),)](
        codes, weight.scales, grad, *tensors, rows, cols, blocks_per_program, numel, blocks, *scalar_values,
        _key(weight_seed),
        scalars["eco_scale"], MAXIMIZE=maximize, BLOCKS=triton.next_power_of_2(blocks_per_program),
        ROWS=rows_per_program if scale_layout == 0 else 1, SCALE_GROUP=scale_layout,
        KIND=WEIGHT_KINDS[fmt], MANTISSA=mantissa, BIAS=bias, FORMAT_MAX=format_max(fmt),
        WEIGHT_STOCHASTIC=weight_seed is not None, ECO=eco,
        FLOAT_STATES=_float_states(formats["exp_avg"], formats["exp_avg_sq"]), **constants,
    )
