"""Bad input: a clear error naming the argument and accepted values, before anything changes."""

import pytest
import torch

import slimtrain as st


def param():
    p = torch.nn.Parameter(torch.ones(5000))
    p.grad = torch.ones(5000)
    return p


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(state_bits=5), r"state_bits must be one of \(32, 16, 8, 4, 3, 2\)"),
        (dict(state_bits=(4, 1)), "state_bits"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=0.9), "betas"),
        (dict(lr=-1.0), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(state_maps=("log", "log")), r"map of m"),
        (dict(state_maps=("dynamic", "nf4")), r"map of v"),
        (dict(state_rounding="up"), r"'nearest', 'stochastic'"),
        (dict(block_size=4), "block_size"),
        (dict(quantile=1.0), "quantile"),
        (dict(beta1_policy="auto"), r"'scaled', 'fixed'"),
        (dict(seed=-3), "seed"),
    ],
)
def test_adamw_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        st.AdamW([param()], **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=0.9, nesterov=True, dampening=0.1), "nesterov"),
        (dict(state_bits=1), "state_bits"),
        (dict(state_maps="log"), "state_maps"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_sgd_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        st.SGD([param()], **kwargs)


def test_sparse_gradient_is_refused_before_any_update():
    dense, sparse = param(), torch.nn.Parameter(torch.ones(4, 3))
    sparse.grad = torch.eye(4, 3).to_sparse()
    opt = st.AdamW([dense, sparse], lr=0.1, state_bits=(4, 2))
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, torch.ones(5000)) and len(opt.state) == 0
