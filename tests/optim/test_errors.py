"""Bad input: a clear error naming the argument and accepted values, before anything changes."""

import pytest
import torch

import slimtrain as st
from slimtrain.optim.lowrank import LowRankAdamW


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


def test_sgd_weight_update_default_follows_each_groups_momentum():
    """weight_update=None: "eco" for a group with momentum, "naive" for one without, whatever the
    constructor's momentum."""
    def low_precision():
        return st.QuantizedWeight.from_float(torch.randn(8, 32), st.WeightFormat("fp8_e4m3", "row"))

    opt = st.SGD([{"params": [torch.nn.Parameter(low_precision())], "momentum": 0.0},
                  {"params": [torch.nn.Parameter(low_precision())]}], lr=0.1, momentum=0.9)
    assert [g["weight_update"] for g in opt.param_groups] == ["naive", "eco"]
    opt = st.SGD([{"params": [torch.nn.Parameter(low_precision())], "momentum": 0.9}], lr=0.1)
    assert opt.param_groups[0]["weight_update"] == "eco"


def test_low_rank_adamw_refuses_other_dtypes_before_any_update():
    first, second = torch.nn.Parameter(torch.ones(16, 8)), torch.nn.Parameter(torch.ones(16, 8).double())
    first.grad, second.grad = torch.ones(16, 8), torch.ones(16, 8).double()
    opt = LowRankAdamW([first, second], lr=0.1, rank=2)
    with pytest.raises(TypeError, match="float32"):
        opt.step()
    assert torch.equal(first, torch.ones(16, 8)) and len(opt.state) == 0


def test_low_rank_adamw_moves_a_matrix_within_its_gradients_top_subspace():
    """GaLore-style steps: between refreshes a (12, 30) weight moves only within the span of the
    top-2 left singular vectors of the gradient at the refresh; a vector takes plain AdamW steps."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(12, 30, generator=generator))
    vector = torch.nn.Parameter(torch.randn(30, generator=generator))
    start, vector_start = matrix.detach().clone(), vector.detach().clone()
    opt = LowRankAdamW([matrix, vector], lr=1e-2, rank=2, refresh_every=10)
    reference = torch.optim.AdamW([torch.nn.Parameter(vector_start.clone())], lr=1e-2, weight_decay=0.0,
                                  foreach=False)
    first_grad = torch.randn(12, 30, generator=generator)
    basis = torch.linalg.svd(first_grad, full_matrices=False)[0][:, :2]
    for step in range(5):
        matrix.grad = first_grad if step == 0 else torch.randn(12, 30, generator=generator)
        vector.grad = torch.randn(30, generator=generator)
        reference.param_groups[0]["params"][0].grad = vector.grad.clone()
        opt.step()
        reference.step()
    moved = matrix.detach() - start
    assert moved.norm() > 1e-2
    assert torch.allclose(moved, basis @ (basis.T @ moved), atol=1e-5)  # nothing outside span(Q)
    assert torch.allclose(vector.detach(), reference.param_groups[0]["params"][0].detach(), atol=1e-6)
