"""The Triton kernel of the fused AdamW step (the CUDA path for low-bit states) gives the eager
step's bits: the cases of tests/optim/triton_cases.py, each in a fresh process under Triton's
interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", ["configurations", "special_values", "uncovered"])
def test_triton_kernel_gives_the_eager_bits(case):
    result = subprocess.run([sys.executable, "-m", "tests.optim.triton_cases", case], cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
