"""Optimizer steps on a CUDA device: skipped where there is none (CI); run on a GPU machine with
``pytest tests/optim/test_cuda.py`` (benchmarks/gpu_checks.sh does).

On CUDA, steps run through the hand-written Triton kernel where it covers the state formats, else
through torch.compile (Triton). Compiled and eager code, and the CUDA and CPU steps, use different
math (fused multiply-adds, log2, exp2, division), so values agree to rounding and codes differ
only where a value lies at a level boundary; the same seeds give the same stochastic-rounding
noise everywhere. The hand-written kernel, launched without fused multiply-adds, should give the
eager CUDA step's bits.
"""

import pytest
import torch

import slimtrain as st
from tests.optim.helpers import assert_agree_to_rounding
from tests.optim.test_kernels import run, run_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="stochastic"),
    dict(state_bits=(8, 8), state_maps=("linear", "dynamic")),
]
SHAPE = (300, 70)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed compilation must not pass as eager
@pytest.mark.parametrize("options", CUDA_CONFIGURATIONS, ids=str)
def test_compiled_and_eager_agree_on_cuda(options):
    compiled = run(True, SHAPE, device="cuda", **options)
    assert compiled[0].is_cuda and compiled[1]["exp_avg_sq_codes"].is_cuda
    assert_agree_to_rounding(compiled, run(False, SHAPE, device="cuda", **options))


@pytest.mark.parametrize("options", CUDA_CONFIGURATIONS, ids=str)
def test_cuda_and_cpu_steps_agree_to_rounding(options):
    assert_agree_to_rounding(run(True, SHAPE, device="cuda", **options), run(True, SHAPE, **options))


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_float8_eco_step_on_cuda_agrees_with_eager_and_cpu():
    """The slim recipe's weight update (FP8 rows, ECO, SR, (4, 2) states): compiled on CUDA."""
    options = dict(state_bits=(4, 2), rounding="stochastic")
    compiled = run_weight(True, (77, 192), device="cuda", **options)
    assert compiled[0].codes.is_cuda
    assert_agree_to_rounding(compiled, run_weight(False, (77, 192), device="cuda", **options))
    assert_agree_to_rounding(compiled, run_weight(True, (77, 192), **options), share=0.05)


def test_float32_states_on_cuda_are_torchs_fused_adamw_bit_for_bit():
    torch.manual_seed(0)
    start = torch.randn(300, 70, device="cuda")
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = st.AdamW([ours], lr=1e-2, weight_decay=0.1)
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(5):
        grad = torch.randn_like(start)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_ref.step()
    assert torch.equal(ours, ref) and not opt_ours.state[ours]["step"].is_cuda


TRITON_CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="nearest"),
    dict(state_bits=(4, 4), maximize=True, block_size=32, weight_decay=0.3),
    dict(state_bits=(3, 2)),
    dict(state_bits=(8, 8)),
    dict(state_bits=(2, 2), state_rounding="stochastic"),  # the solo-2-2 recipe's m
]


@pytest.mark.parametrize("options", TRITON_CONFIGURATIONS, ids=str)
def test_triton_kernel_gives_the_eager_cuda_bits(monkeypatch, options):
    pytest.importorskip("triton")
    from slimtrain.optim.kernels import triton_adamw

    calls, original = [], triton_adamw.adamw_step
    monkeypatch.setattr(triton_adamw, "adamw_step", lambda *a: calls.append(1) or original(*a))
    fused_param, fused_state = run(True, SHAPE, device="cuda", **options)
    assert calls, "the Triton kernel did not run"
    eager_param, eager_state = run(False, SHAPE, device="cuda", **options)
    assert torch.equal(fused_param, eager_param)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


@pytest.mark.parametrize("options", [dict(state_bits=(4, 2), rounding="stochastic"),
                                     dict(state_bits=(4, 2), rounding="nearest", weight_update="naive")],
                         ids=str)
def test_triton_weight_kernel_gives_the_eager_cuda_bits(monkeypatch, options):
    """The slim recipe's float8 weight step in the Triton kernel against eager CUDA ops."""
    pytest.importorskip("triton")
    from slimtrain.optim.kernels import triton_adamw

    calls, original = [], triton_adamw.adamw_weight_step
    monkeypatch.setattr(triton_adamw, "adamw_weight_step", lambda *a: calls.append(1) or original(*a))
    fused_weight, fused_state = run_weight(True, (96, 384), device="cuda", **options)
    assert calls, "the Triton kernel did not run"
    eager_weight, eager_state = run_weight(False, (96, 384), device="cuda", **options)
    assert torch.equal(fused_weight.codes.view(torch.uint8), eager_weight.codes.view(torch.uint8))
    assert torch.equal(fused_weight.scales, eager_weight.scales)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key
