"""log2 and exp2 built only from correctly rounded float32 operations (+, -, *, /, frexp, scaling by
powers of two), evaluated in a fixed order.

Library log2/exp2 differ in the last bit between eager torch (glibc or SLEEF, by CPU), compiled
code and the C kernel of :mod:`slimtrain.optim.kernels`; these give the same bits everywhere
(given no fused multiply-add contraction), so that the logarithmic quantizer encodes identically
in every path. Accuracy: within 2 float32 ulps of the true value (tested).
"""

from __future__ import annotations

import torch

# float32 constants, written exactly so that the C kernel uses the same values:
SQRT_HALF = 0.7071067690849304  # sqrt(1/2)
TWO_OVER_LN2 = 2.885390043258667
# log2(m) = (2 / ln 2) * atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: odd series to s^9
ATANH_SERIES = (0.1111111119389534, 0.1428571492433548, 0.20000000298023224, 0.3333333432674408, 1.0)
# 2^r = e^(r ln 2) for |r| <= 1/2: Taylor coefficients ln2^k / k!, k = 8 .. 0 (remainder < 3e-9)
EXP2_POLYNOMIAL = (1.3215486660556053e-06, 1.5252733646775596e-05, 0.0001540352968731895,
                   0.0013333557872101665, 0.009618128649890423, 0.05550410971045494, 0.24022650718688965,
                   0.6931471824645996, 1.0)


def log2(x: torch.Tensor) -> torch.Tensor:
    """Base-2 logarithm of float32 ``x`` (same shape): -inf at 0, +inf at +inf, NaN below 0."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    small = mantissa < SQRT_HALF
    mantissa = torch.where(small, mantissa * 2.0, mantissa)  # now in [sqrt(1/2), sqrt(2))
    exponent = (exponent - small.to(torch.int32)).to(torch.float32)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = torch.full_like(s, ATANH_SERIES[0])
    for c in ATANH_SERIES[1:]:
        series = series * s2 + c
    result = exponent + (s * series) * TWO_OVER_LN2
    result = torch.where(x == 0, -torch.inf, result)
    return torch.where(torch.isfinite(x) & (x >= 0), result, torch.where(x > 0, x, torch.nan))


def _power_of_two(n: torch.Tensor) -> torch.Tensor:
    """2^n as float32 for int32 ``n`` in [-126, 127] (built from the exponent bits)."""
    return ((n + 127) << 23).view(torch.float32)


def exp2(y: torch.Tensor) -> torch.Tensor:
    """2^y for float32 ``y`` (same shape); 0 below -252, +inf above 254, NaN for NaN."""
    clamped = y.clamp(-252.0, 254.0)
    n = torch.floor(clamped + 0.5)
    r = clamped - n  # in [-1/2, 1/2], exact
    poly = torch.full_like(r, EXP2_POLYNOMIAL[0])
    for c in EXP2_POLYNOMIAL[1:]:
        poly = poly * r + c
    whole = n.to(torch.int32)
    half = torch.div(whole, 2, rounding_mode="floor")
    result = poly * _power_of_two(half) * _power_of_two(whole - half)
    result = torch.where(y < -252.0, 0.0, torch.where(y > 254.0, torch.inf, result))
    return torch.where(torch.isnan(y), y, result)
