"""The C kernel of the fused AdamW step gives the same bits as the eager torch step."""

import pytest
import torch

import slimtrain as st
from slimtrain.optim import kernels


def run(fused: bool, shape, steps: int = 4, **options):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape))
    generator = torch.Generator().manual_seed(3)
    opt = st.AdamW([param], lr=1e-2, seed=1, compile=fused, min_quantized_numel=0, **options)
    for _ in range(steps):
        param.grad = torch.randn(shape, generator=generator)
        opt.step()
    return param.detach(), opt.state[param]


def test_kernel_builds_here():
    assert kernels.cpu_kernels() is not None, "gcc is on every machine this project runs tests on"


CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="stochastic"),
    dict(state_bits=(3, 3), state_rounding="nearest"),
    dict(state_bits=(8, 8), state_maps=("linear", "dynamic")),
    dict(state_bits=(32, 2), maximize=True, betas=(0.4, 0.99)),
    dict(state_bits=(4, 32), block_size=64, weight_decay=0.3),
    dict(state_bits=(8, 4), quantile=0.3, block_size=8, eps=1e-3),
]


@pytest.mark.parametrize("options", CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("shape", [(300, 70), (4097,), (3, 5, 61)])
def test_kernel_and_eager_agree_bit_for_bit(options, shape):
    fused_param, fused_state = run(True, shape, **options)
    eager_param, eager_state = run(False, shape, **options)
    assert torch.equal(fused_param, eager_param)
    assert fused_state.keys() == eager_state.keys()
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


def test_kernel_keeps_nan_out_of_finite_steps():
    param, state = run(True, (64, 64), steps=3, state_bits=(2, 2), eps=0.0)
    assert torch.isfinite(param).all()
    assert torch.isfinite(state["exp_avg_sq_scales"]).all()


def test_threads_split_blocks_without_changing_results():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(True, (1024, 129), state_bits=(4, 2))[0]
        torch.set_num_threads(2)
        several = run(True, (1024, 129), state_bits=(4, 2))[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, several)
