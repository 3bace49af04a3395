"""Cases of tests/optim/test_triton.py, run as ``python -m tests.optim.triton_cases CASE`` in a
process started with TRITON_INTERPRET=1 (Triton's interpreter must be on before Triton is first
imported): the Triton kernels step CPU tensors there, each operation computed in float32 by numpy,
as a GPU computes it when the kernel is launched without fused multiply-adds."""

import sys

import torch

import slimtrain as st
from slimtrain.optim import kernels
from slimtrain.optim.kernels import triton_adamw
from tests.optim.test_kernels import run

CALLS: list[int] = []
_original_step = triton_adamw.adamw_step
kernels.TRITON_DEVICES = {"cpu"}
triton_adamw.adamw_step = lambda *a: CALLS.append(1) or _original_step(*a)

CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="nearest"),
    dict(state_bits=(4, 4), maximize=True, block_size=32, weight_decay=0.3),
    dict(state_bits=(2, 4), quantile=0.3, block_size=16, eps=1e-3, betas=(0.5, 0.9)),
]
UNCOVERED = [dict(state_bits=(3, 2)), dict(state_bits=(8, 8)),
             dict(state_bits=(4, 2), state_rounding="stochastic"), dict(state_bits=(4, 2), block_size=48),
             dict(state_bits=(32, 2))]


def assert_same(fused: tuple, eager: tuple, what: str) -> None:
    assert torch.equal(fused[0], eager[0]), f"{what}: parameters differ"
    for key in fused[1]:
        assert torch.equal(fused[1][key], eager[1][key]), f"{what}: {key} differs"


def configurations() -> None:
    """Every covered configuration, two shapes with a partial last block: the eager step's bits
    (small tensors: the interpreter takes about a second per program and step)."""
    for options in CONFIGURATIONS:
        for shape in [(1000,), (3, 5, 61)]:
            CALLS.clear()
            fused = run(True, shape, steps=3, **options)
            assert len(CALLS) == 3, f"{options}: {len(CALLS)} Triton steps of 3"  # the first included
            assert_same(fused, run(False, shape, steps=3, **options), f"{options} {shape}")


def special_values() -> None:
    """Gradients of 0, around 1e-39 (subnormal) and 2^100 (whose squares overflow: v saturates)."""
    grads = torch.tensor([0.0] * 100 + [1e-39] * 20 + [2.0**100] * 3 + [1e-3] * 133)
    results = []
    for fused in (True, False):
        param = torch.nn.Parameter(torch.linspace(-1, 1, len(grads)))
        opt = st.AdamW([param], lr=1e-2, compile=fused, min_quantized_numel=0, state_bits=(4, 2), seed=3)
        for scale in (1.0, -0.5):
            param.grad = grads * scale
            opt.step()
        results.append((param.detach().clone(), opt.state[param]))
    assert len(CALLS) == 2
    assert_same(*results, "special values")


def uncovered() -> None:
    """Formats the kernel does not cover take the C kernel (the same bits), never the Triton one."""
    for options in UNCOVERED:
        fused = run(True, (4097,), steps=2, **options)
        assert not CALLS, f"{options}: stepped by the Triton kernel"
        assert_same(fused, run(False, (4097,), steps=2, **options), str(options))


if __name__ == "__main__":
    cases = {"configurations": configurations, "special_values": special_values, "uncovered": uncovered}
    cases[sys.argv[1]]()
