"""Single-thread optimizer step time in ns per parameter (best of STEPS steps), for A/B runs of
kernel changes on one machine: float32 parameters with (m, v) state bits, and FP8 E4M3 weights
with row scales and ECO (stochastic or nearest rounding).

    python benchmarks/step_time.py [--log2-numel 22] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import slimtrain as st

CONFIGURATIONS = {  # name: (state bits, weight rounding or None for a float32 parameter)
    "float32 (4, 2)": ((4, 2), None),
    "FP8 + ECO (SR) (4, 2)": ((4, 2), "stochastic"),
    "FP8 + ECO (RTN) (4, 2)": ((4, 2), "nearest"),
    "FP8 + ECO (SR) (32, 32)": ((32, 32), "stochastic"),
}


def best_ns_per_param(bits: tuple[int, int], rounding: str | None, numel: int, steps: int) -> float:
    weight = torch.randn(numel // 1024, 1024) * 0.05
    if rounding:
        weight = st.QuantizedWeight.from_float(weight, st.WeightFormat("fp8_e4m3", "row"))
    param = torch.nn.Parameter(weight)
    param.grad = torch.randn(numel // 1024, 1024) * 1e-2
    optimizer = st.AdamW([param], lr=1e-3, state_bits=bits, rounding=rounding or "nearest")
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times) * 1e9 / numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-numel", type=int, default=22)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, (bits, rounding) in CONFIGURATIONS.items():
        ns = best_ns_per_param(bits, rounding, 2**args.log2_numel, args.steps)
        print(f"{name:<26} {ns * args.threads:6.2f} thread-ns/param", flush=True)


if __name__ == "__main__":
    main()
