"""The torch.compile step (the GPU path; on a CPU the path of formats no C kernel covers), traced
here by Inductor's C++ backend, agrees with the eager step up to rounding (compiled code may fuse
multiply-adds, so the bits can differ where a value lies at a level boundary)."""

import pytest
import torch
from torch._dynamo.utils import counters

import slimtrain as st
import slimtrain.optim.base as base
from slimtrain.optim import kernels
from tests.optim.helpers import assert_agree_to_rounding
from tests.optim.test_kernels import run, run_weight


@pytest.fixture
def compiled_calls(monkeypatch):
    """No C kernel, compiled steps for weights on the CPU too; counts the compiled calls."""
    calls, original = [], base.compiled_step_chunk
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
    monkeypatch.setattr(base, "EAGER_WEIGHT_DEVICES", set())
    monkeypatch.setattr(base, "compiled_step_chunk", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed compilation must not pass as eager
def test_compiled_low_bit_states_agree_with_eager(compiled_calls):
    options = dict(state_bits=(4, 2), state_rounding="nearest")
    compiled = run(True, (300, 70), steps=3, **options)
    assert len(compiled_calls) == 2  # the first step is eager
    assert_agree_to_rounding(compiled, run(False, (300, 70), steps=3, **options))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_compiled_eco_weight_step_agrees_with_eager(compiled_calls, fmt):
    """A quantized weight goes into the compiled step as its plain codes and scales."""
    options = dict(state_bits=(32, 32), rounding="stochastic")
    compiled = run_weight(True, (64, 96), fmt, steps=3, **options)
    assert len(compiled_calls) == 2  # the first step is eager
    assert_agree_to_rounding(compiled, run_weight(False, (64, 96), fmt, steps=3, **options))


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_steps_do_not_recompile(compiled_calls):
    """Seeds, learning rates and step counts change every step; none may trigger a new graph."""
    weight = st.QuantizedWeight.from_float(torch.randn(64, 96) * 0.05, st.WeightFormat("fp8_e4m3", "row"))
    param = torch.nn.Parameter(weight)
    opt = st.AdamW([param], lr=1e-2, state_bits=(32, 32), rounding="stochastic", min_quantized_numel=0)
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        opt.param_groups[0]["lr"] = 1e-2 * (1 + step)  # a schedule
        param.grad = torch.randn(64, 96, generator=generator) * 0.1
        opt.step()
        if step == 1:  # the first compiled step (step 0 runs eagerly): later ones must reuse its graph
            graphs = counters["stats"]["unique_graphs"]
    assert len(compiled_calls) == 5
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_weights_of_several_shapes_compile_and_agree_with_eager(compiled_calls):
    """A model's weights come in many shapes: after the second, dynamo compiles a graph with
    symbolic sizes (what a GPU training run relies on), which must still agree with eager."""
    def run_model(compile: bool) -> list:
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(st.QuantizedWeight.from_float(
            torch.randn(shape) * 0.05, st.WeightFormat("fp8_e4m3", "row"))) for shape in shapes]
        opt = st.AdamW(weights, lr=1e-2, state_bits=(32, 32), rounding="stochastic",
                       compile=compile, seed=2)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in weights:
                p.grad = torch.randn(p.shape, generator=generator) * 0.1
            opt.step()
        return [(p, opt.state[p]) for p in weights]

    shapes = [(64, 96), (32, 160), (48, 64)]
    for compiled, eager in zip(run_model(True), run_model(False), strict=True):
        assert_agree_to_rounding(compiled, eager)
    assert len(compiled_calls) == 2 * len(shapes)
