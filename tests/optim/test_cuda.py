"""Optimizer steps on a CUDA device: skipped where there is none (CI); run on a GPU machine with
``pytest tests/optim/test_cuda.py``.

On CUDA a float32 parameter with quantized states steps through torch.compile (Triton), which must
give the eager CUDA step's bits. The CUDA and CPU steps use different math libraries (log2, exp2,
division), so across devices values agree to rounding and codes differ only where a value lies at
a level boundary; the same seeds give the same stochastic-rounding noise on both.
"""

import pytest
import torch

from tests.optim.test_kernels import run, run_float8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="stochastic"),
    dict(state_bits=(8, 8), state_maps=("linear", "dynamic")),
]
SHAPE = (300, 70)


def differing(first: torch.Tensor, second: torch.Tensor, tolerance: float = 0.0) -> float:
    """Fraction of elements of two same-shaped tensors that differ by more than ``tolerance``."""
    first, second = first.detach().cpu().float(), second.detach().cpu().float()
    return ((first - second).abs() > tolerance).float().mean().item()


@pytest.mark.parametrize("options", CUDA_CONFIGURATIONS, ids=str)
def test_compiled_and_eager_agree_bit_for_bit_on_cuda(options):
    compiled, compiled_state = run(True, SHAPE, device="cuda", **options)
    eager, eager_state = run(False, SHAPE, device="cuda", **options)
    assert compiled.is_cuda and compiled_state["exp_avg_sq_codes"].is_cuda
    assert torch.equal(compiled, eager), f"{differing(compiled, eager):.3%} of parameters differ"
    for key in compiled_state:
        assert torch.equal(compiled_state[key], eager_state[key]), \
            f"{key}: {differing(compiled_state[key], eager_state[key]):.3%} differ"


@pytest.mark.parametrize("options", CUDA_CONFIGURATIONS, ids=str)
def test_cuda_and_cpu_steps_agree_to_rounding(options):
    gpu, gpu_state = run(True, SHAPE, device="cuda", **options)
    cpu, cpu_state = run(True, SHAPE, **options)
    assert differing(gpu, cpu, tolerance=1e-5) < 0.01
    for key in cpu_state:
        assert gpu_state[key].dtype == cpu_state[key].dtype
        assert differing(gpu_state[key], cpu_state[key], tolerance=1e-5) < 0.01, key


def test_float8_eco_step_on_cuda_agrees_with_cpu():
    """The slim recipe's weight update (FP8 rows, ECO, SR, (4, 2) states) on CUDA."""
    options = dict(state_bits=(4, 2), rounding="stochastic")
    gpu, gpu_state = run_float8(True, (77, 192), device="cuda", **options)
    cpu, cpu_state = run_float8(True, (77, 192), **options)
    assert gpu.codes.is_cuda
    assert differing(gpu.codes.view(torch.uint8), cpu.codes.view(torch.uint8)) < 0.01
    assert differing(gpu.scales, cpu.scales, tolerance=1e-6) < 0.05
    for key in cpu_state:
        assert differing(gpu_state[key], cpu_state[key], tolerance=1e-5) < 0.01, key
