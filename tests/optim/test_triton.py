"""The Triton kernel of the fused AdamW step (the CUDA path for low-bit states) gives the eager
step's bits: the cases of tests/optim/triton_cases.py, each in a fresh process under Triton's
interpreter. A kernel that fails to compile or launch leaves the step to the other paths."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slimtrain.optim import kernels
from tests.optim.test_kernels import run

ROOT = Path(__file__).resolve().parents[2]


CASES = ["training", "configurations", "weights", "random_gradients", "special_values", "uncovered",
         "elementary_functions"]  # the longest first: they run side by side, one per core


@pytest.fixture(scope="module")
def case_runs():
    """Every case started at once, as many at a time as there are cores: {case: its future}."""
    pytest.importorskip("triton")
    # glibc's malloc checks abort the process where a kernel wrote past a tensor's end
    # one thread each: they run side by side
    env = {**os.environ, "TRITON_INTERPRET": "1", "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165",
           "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {case: pool.submit(subprocess.run, [sys.executable, "-m", "tests.optim.triton_cases", case],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
               for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_gives_the_eager_bits(case, case_runs):
    result = case_runs[case].result()
    assert result.returncode == 0, result.stderr[-3000:]


class FailingKernels:
    """A Triton module whose kernel cannot be compiled (as on a GPU its compiler rejects)."""

    calls = 0

    @staticmethod
    def supported(m_format, v_format) -> bool:
        return True

    @classmethod
    def adamw_step(cls, *args) -> None:
        cls.calls += 1
        raise RuntimeError("PTX assembly failed")


def test_a_failing_triton_kernel_warns_once_and_the_step_takes_the_other_paths(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_triton", FailingKernels)
    monkeypatch.setattr(kernels, "triton_failure", None)
    monkeypatch.setattr(kernels, "triton_steps", 0)
    with pytest.warns(RuntimeWarning, match="Triton kernel failed .*PTX assembly failed"):
        fused = run(True, (4097,), steps=3, state_bits=(4, 2))
    assert FailingKernels.calls == 1 and kernels.triton_kernels() is None
    assert kernels.triton_status() == ("failed after 0 steps (RuntimeError: PTX assembly failed); "
                                       "torch.compile took their steps")
    eager = run(False, (4097,), steps=3, state_bits=(4, 2))
    assert torch.equal(fused[0], eager[0])  # the C kernel took every step: the eager bits
