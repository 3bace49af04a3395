"""log2 / exp2 from basic float32 operations: accuracy against float64 and special values."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtrain.quant import elementary

positive = st.floats(min_value=2.0**-149, max_value=3.4028234663852886e38, allow_nan=False, width=32)
exponents = st.floats(min_value=-149.0, max_value=127.875, allow_nan=False, width=32)
ULP = torch.finfo(torch.float32).eps


@settings(max_examples=300, deadline=None)
@given(xs=st.lists(positive, min_size=1, max_size=200))
def test_log2_within_two_ulps(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    exact = torch.log2(x.double())
    error = (elementary.log2(x).double() - exact).abs()
    assert (error <= 2 * ULP * exact.abs().clamp(min=1.0)).all()


@settings(max_examples=300, deadline=None)
@given(ys=st.lists(exponents, min_size=1, max_size=200))
def test_exp2_within_two_ulps_of_normal_results(ys):
    y = torch.tensor(ys, dtype=torch.float32)
    exact = torch.exp2(y.double())
    got = elementary.exp2(y).double()
    normal = exact >= torch.finfo(torch.float32).tiny
    assert ((got - exact).abs() <= 2 * ULP * exact)[normal].all()
    assert ((got - exact).abs() <= 2.0**-149)[~normal].all()  # subnormal results: one spacing


def test_special_values():
    x = torch.tensor([0.0, -0.0, -1.0, math.inf, math.nan, 1.0, 2.0, 0.5, 2.0**-149])
    got = elementary.log2(x)
    assert got[:2].tolist() == [-math.inf, -math.inf]
    assert math.isnan(got[2]) and got[3] == math.inf and math.isnan(got[4])
    assert got[5:].tolist() == [0.0, 1.0, -1.0, -149.0]  # exact at powers of two
    y = torch.tensor([-1000.0, 1000.0, math.nan, 0.0, 10.0, -3.0])
    got = elementary.exp2(y)
    assert got[0] == 0 and got[1] == math.inf and math.isnan(got[2])
    assert got[3:].tolist() == [1.0, 1024.0, 0.125]
