"""Optimizer step time and state bytes per parameter: slimtrain vs torch.optim and installed peers.

Every configuration updates one (n/1024, 1024) float32 parameter with a fixed random gradient;
after warm-up steps (which include any compilation) the median of timed steps is reported, with
its ratio to torch.optim.AdamW(fused=True) measured in the same run. State bytes are measured
from the storage of the optimizer's real state tensors.

    python benchmarks/optim_step.py [--sizes 1M 4M 16M] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import slimtrain as st


def peers() -> dict[str, Callable]:
    """Optimizers of installed peer libraries (none is a dependency of slimtrain)."""
    found: dict[str, Callable] = {}
    try:
        from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8

        found["torchao AdamW8bit"] = lambda p: AdamW8bit(p, lr=1e-3)
        found["torchao AdamW4bit"] = lambda p: AdamW4bit(p, lr=1e-3)
        found["torchao AdamWFp8"] = lambda p: AdamWFp8(p, lr=1e-3)
    except ImportError as error:
        print(f"(torchao not measured: {error})")
    try:
        from solo import AdamWQ  # the `solow` package

        found["solow AdamWQ (4, 2)"] = lambda p: AdamWQ(p, lr=1e-3, bits=(4, 2))
    except ImportError as error:
        print(f"(solow not measured: {error})")
    try:
        from optimi import AdamW as OptimiAdamW

        found["torch-optimi AdamW"] = lambda p: OptimiAdamW(p, lr=1e-3)
    except ImportError as error:
        print(f"(torch-optimi not measured: {error})")
    return found


def configurations() -> dict[str, Callable]:
    configs: dict[str, Callable] = {
        "torch AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    }
    for bits in [(32, 32), (8, 8), (4, 2), (3, 2), (2, 2)]:
        configs[f"st.AdamW {bits}"] = lambda p, bits=bits: st.AdamW(p, lr=1e-3, state_bits=bits)
    configs["st.AdamW (4, 2) eager"] = lambda p: st.AdamW(p, lr=1e-3, state_bits=(4, 2), compile=False)
    configs.update(peers())
    return configs


def measure(make: Callable, numel: int, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median step seconds, first-step seconds, optimizer state bytes per parameter)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel // 1024, 1024))
    param.grad = torch.randn_like(param) * 1e-2
    optimizer = make([param])
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    per_param = st.memory_report([param], optimizer).per_parameter("optimizer_state")
    return statistics.median(times), first, per_param


def parse_size(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("KkMm")) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="substrings of configuration names to run")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    configs = configurations()
    if args.only:
        configs = {k: v for k, v in configs.items() if k.startswith("torch AdamW fused")
                   or any(s in k for s in args.only)}
    results = []
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, CPU: {device}")
    for size in args.sizes:
        numel = parse_size(size)
        print(f"\n{numel:,} parameters")
        print(f"{'configuration':<26}{'step ms':>10}{'x fused':>9}{'first ms':>10}{'state B/param':>15}")
        baseline = None
        for name, make in configs.items():
            seconds, first, per_param = measure(make, numel, args.warmup, args.steps)
            baseline = baseline or seconds
            ratio = seconds / baseline
            print(f"{name:<26}{seconds * 1e3:>10.1f}{ratio:>9.2f}{first * 1e3:>10.0f}{per_param:>15.3f}",
                  flush=True)
            results.append(dict(numel=numel, name=name, step_ms=seconds * 1e3, ratio_to_fused=ratio,
                                first_step_ms=first * 1e3, state_bytes_per_param=per_param))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=device, results=results), f, indent=1)


if __name__ == "__main__":
    main()
