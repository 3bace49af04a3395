import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from slimtrain.quant import (
    block_quantile,
    codebook,
    dequantize_absmax,
    dequantize_log,
    quantize_absmax,
    quantize_log,
    to_blocks,
)
from slimtrain.quant.blockwise import QUANTILE_BISECTION_STEPS
from slimtrain.quant.packing import unpack

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
values = st.lists(finite, min_size=1, max_size=300)
nonneg = st.lists(st.floats(0, 2.0**127, allow_nan=False, width=32), min_size=1, max_size=300)
widths = st.sampled_from([2, 3, 4, 8])
block_sizes = st.sampled_from([8, 16, 128])


@settings(max_examples=150, deadline=None)
@given(xs=values, bits=widths, kind=st.sampled_from(["dynamic", "linear"]), block=block_sizes)
@example(xs=[0.0, 1.5550769577998225e-40], bits=2, kind="dynamic", block=8)  # 1 / absmax overflows
def test_absmax_nearest_picks_the_nearest_level(xs, bits, kind, block):
    x = torch.tensor(xs)
    codes, scales = quantize_absmax(x, bits, kind, True, block)
    assert scales.shape == (math.ceil(x.numel() / block),)
    y = dequantize_absmax(codes, scales, bits, x.numel(), block, kind, True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    scale = scales.repeat_interleave(block)[: x.numel()]
    safe = torch.where(scale > 0, scale, 1.0)
    levels = codebook(kind, bits, True).double()
    best = ((x / safe).double()[:, None] - levels[None, :]).abs().min(dim=1).values
    got = (y - x).double().abs()
    assert torch.all(got <= (best + 1e-6) * safe + 2**-148)  # plus rounding of subnormal products


@settings(max_examples=100, deadline=None)
@given(xs=values, bits=widths, block=block_sizes, seed=st.integers(0, 2**31 - 2))
def test_absmax_stochastic_lands_on_a_neighbour(xs, bits, block, seed):
    x = torch.tensor(xs)
    codes, scales = quantize_absmax(x, bits, "dynamic", True, block, seed=seed)
    y = dequantize_absmax(codes, scales, bits, x.numel(), block, "dynamic", True)
    assert torch.isfinite(y).all()
    # the code is one of the two levels around x / scale (as the quantizer normalizes it; a
    # subnormal scale is boosted by 2^24 first), found here by torch.searchsorted
    scale = scales.repeat_interleave(block)[: x.numel()]
    boost = torch.where(scale < torch.finfo(torch.float32).tiny, 2.0**24, 1.0)
    normalized = (x * boost) * (1.0 / torch.where(scale > 0, scale * boost, 1.0))
    levels = codebook("dynamic", bits, True)
    low = (torch.searchsorted(levels, normalized, right=True) - 1).clamp(0, levels.numel() - 2)
    code = unpack(codes, bits, x.numel()).long()
    assert torch.all((code == low) | (code == low + 1))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("target", [0.013, 0.3, -0.61])
def test_absmax_stochastic_rounding_is_unbiased(bits, target):
    n = 40_000
    x = torch.full((n,), target)
    x[::128] = 1.0  # every block has absmax 1
    mask = torch.ones(n, dtype=torch.bool)
    mask[::128] = False
    codes, scales = quantize_absmax(x, bits, "linear", True, 128, seed=123)
    y = dequantize_absmax(codes, scales, bits, n, 128, "linear", True)[mask]
    gap = 2 / (2**bits - 2)
    # each draw is within one gap: the mean of m draws has std <= gap / (2 sqrt m); allow 5 sigma
    assert abs(y.double().mean().item() - target) < 5 * gap / (2 * math.sqrt(y.numel()))


def test_absmax_all_zero_and_subnormal_blocks():
    x = torch.zeros(300)
    x[128:256] = 1e-42  # subnormal block
    for seed in (None, 5):
        codes, scales = quantize_absmax(x, 4, seed=seed)
        y = dequantize_absmax(codes, scales, 4, 300)
        assert torch.isfinite(y).all()
        assert torch.all(y[:128] == 0) and torch.all(y[256:] == 0)


@settings(max_examples=150, deadline=None)
@given(xs=nonneg, bits=widths, block=block_sizes, p=st.sampled_from([0.05, 0.1, 0.5]))
def test_log_nearest_within_half_a_level_in_log_domain(xs, bits, block, p):
    x = torch.tensor(xs)
    codes, scales = quantize_log(x, bits, block, p)
    y = dequantize_log(codes, scales, bits, x.numel(), block)
    assert torch.isfinite(y).all() and torch.all(y >= 0)
    top, bottom = scales[:, 0], scales[:, 1]
    assert torch.all(bottom <= top)
    step = (torch.log2(top.clamp(min=1e-45)) - torch.log2(bottom.clamp(min=1e-45))) / (2**bits - 1)
    top_e = top.repeat_interleave(block)[: x.numel()]
    bottom_e = bottom.repeat_interleave(block)[: x.numel()]
    step_e = step.repeat_interleave(block)[: x.numel()]
    assert torch.all(y[top_e == 0] == 0)
    inside = (x >= bottom_e) & (x <= top_e) & (x >= 1e-37)  # normal floats within the grid
    err = (torch.log2(y[inside]) - torch.log2(x[inside])).abs()
    assert torch.all(err <= step_e[inside] / 2 + 1e-4)
    below = (x < bottom_e) & (top_e > 0)
    assert torch.allclose(y[below], bottom_e[below], rtol=1e-5)


def test_log_quantizer_edge_cases():
    torch.manual_seed(0)
    block = torch.rand(128) + 0.5
    many_zeros = block.clone()
    many_zeros[:100] = 0  # quantile is 0: the reference decodes everything to the max
    all_zero = torch.zeros(128)
    tail = torch.rand(37) + 1.0  # a short last block
    x = torch.cat([block, many_zeros, all_zero, tail])
    codes, scales = quantize_log(x, 2, 128, 0.1)
    y = dequantize_log(codes, scales, 2, x.numel(), 128)
    assert torch.isfinite(y).all()
    assert torch.all(y[256:384] == 0)
    nz = many_zeros[100:]
    assert scales[1, 1] == nz.min()  # smallest positive element anchors the levels
    assert (y[228:256] - nz).abs().max() <= nz.max() - nz.min()
    assert y[228:256].unique().numel() > 1
    ref = torch.sort(tail).values[math.ceil(0.1 * 37) - 1]
    assert scales[3, 1] in tail and ref <= scales[3, 1]  # tail quantile from its own 37 elements
    assert (tail <= scales[3, 1]).sum() <= math.ceil(0.1 * 37) + 2


@pytest.mark.parametrize("bits", [2, 4])
def test_log_stochastic_rounding_is_unbiased_in_the_exponent(bits):
    n = 128 * 300
    x = torch.full((n,), 0.02)
    x[::128] = 1.0
    x[1::128] = 1e-3  # sets the lowest level
    codes, scales = quantize_log(x, bits, 128, 0.01, seed=77)
    y = dequantize_log(codes, scales, bits, n, 128)
    keep = torch.ones(n, dtype=torch.bool)
    keep[::128] = False
    keep[1::128] = False
    step = math.log2(1e3) / (2**bits - 1)
    mean_log = torch.log2(y[keep].double()).mean().item()
    assert abs(mean_log - math.log2(0.02)) < 5 * step / (2 * math.sqrt(keep.sum().item()))


@settings(max_examples=100, deadline=None)
@given(xs=nonneg, p=st.sampled_from([0.05, 0.1, 0.3]))
@example(xs=[0.0, 1.0, 7.234017709302147e31, 0.75], p=0.05)  # zero quantile, 105-octave range
def test_block_quantile_brackets_the_true_quantile(xs, p):
    x = torch.tensor(xs)
    blocks = to_blocks(x, 512)
    got = block_quantile(blocks, x.numel(), p)[0]
    k = max(1, math.ceil(p * x.numel()))
    true = torch.sort(x).values[k - 1]
    positive = x[x > 0]
    if positive.numel() == 0:
        assert got == 0
        return
    if true == 0:
        assert got == positive.min()
        return
    assert (x <= got).sum() >= k
    span = math.log2(positive.max()) - math.log2(positive.min())
    assert math.log2(got) <= math.log2(true) + span / 2 ** (QUANTILE_BISECTION_STEPS - 1) + 1e-6


def test_log_quantizer_saturates_an_overflowed_value():
    """A second moment whose square overflowed (+inf) is stored as the largest float32 instead of
    turning its block into NaN: the other elements decode to finite values, and the top level to
    about 2^128 (it may round to +inf again, which gives a zero update, as a float32 v of inf does)."""
    x = torch.tensor([float("inf"), 1.0, 0.0, 3.0])
    codes, scales = quantize_log(x, 2, block_size=4)
    assert scales[0, 0] == torch.finfo(torch.float32).max
    y = dequantize_log(codes, scales, 2, 4, block_size=4)
    assert not torch.isnan(y).any() and torch.isfinite(y[1:]).all() and y[0] >= 2.0**127
