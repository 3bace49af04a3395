"""``slimtrain bench``: optimizer step time, bytes moved and achieved bandwidth on this machine.

Every configuration updates one (n/1024, 1024) parameter (float32, or FP8 E4M3 with row scales
for the "FP8 + ECO" configurations) with a fixed random gradient. After warm-up steps (the first
includes any compilation, reported apart) the median of timed steps is reported with its ratio
to ``torch.optim.AdamW(fused=True)`` in the same run: each timed step follows a fused AdamW step
timed just before it (each of the two after an untimed step of its own), and the ratio is the
median of these pairs' ratios, so that the slow drifts of a shared machine cancel instead of
landing between two configurations. State bytes come from the storage
of the optimizer's real tensors. Bytes moved per parameter is the traffic a step cannot avoid:
read and write the parameter's storage and each state, read the float32 gradient (28 B for
float32 AdamW, about 8 for FP8 weights with 4/2-bit states). Achieved bandwidth is that traffic
over the step time, also as a fraction of a copy's bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import slimtrain as st
from slimtrain.optim import kernels

COPY_NUMEL = 2**25  # 128 MiB per side: far beyond the caches


@dataclass(frozen=True)
class BenchResult:
    """One configuration at one size. Times in milliseconds, bandwidths in GB/s (1e9 bytes);
    ratio_low and ratio_high: the quartiles of the paired ratios whose median is ratio_to_fused
    (how much a shared machine's timings spread)."""

    name: str
    numel: int
    step_ms: float
    ratio_to_fused: float
    ratio_low: float
    ratio_high: float
    first_step_ms: float
    state_bytes_per_param: float
    bytes_moved_per_param: float
    bandwidth_gbs: float
    fraction_of_copy: float


def peers() -> dict[str, Callable]:
    """Optimizers of the installed peer libraries (none is a dependency of slimtrain)."""
    found: dict[str, Callable] = {}
    try:
        from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8

        found["torchao AdamW8bit"] = lambda p: AdamW8bit(p, lr=1e-3)
        found["torchao AdamW4bit"] = lambda p: AdamW4bit(p, lr=1e-3)
        found["torchao AdamWFp8"] = lambda p: AdamWFp8(p, lr=1e-3)
    except ImportError:
        pass
    try:
        from solo import AdamWQ  # the `solow` package

        found["solow AdamWQ (4, 2)"] = lambda p: AdamWQ(p, lr=1e-3, bits=(4, 2))
    except ImportError:
        pass
    try:
        from optimi import AdamW as OptimiAdamW

        found["torch-optimi AdamW"] = lambda p: OptimiAdamW(p, lr=1e-3)
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        found["bitsandbytes AdamW8bit"] = lambda p: bnb.optim.AdamW8bit(p, lr=1e-3)
    except (ImportError, RuntimeError):
        pass
    return found


def configurations() -> dict[str, Callable]:
    """Name -> optimizer factory: torch's AdamW, slimtrain's configurations, installed peers."""
    configs: dict[str, Callable] = {
        BASELINE: lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    }
    for bits in [(32, 32), (8, 8), (4, 2), (3, 2), (2, 2)]:
        configs[f"st.AdamW {bits}"] = lambda p, bits=bits: st.AdamW(p, lr=1e-3, state_bits=bits)
    for bits in [(32, 32), (4, 2)]:  # compile=False: torch.optim.AdamW's single-tensor path at 32 bits
        configs[f"st.AdamW {bits} eager"] = lambda p, bits=bits: st.AdamW(
            p, lr=1e-3, state_bits=bits, compile=False)
    for bits in [(32, 32), (4, 2)]:
        configs[f"st.AdamW{FLOAT8_MARK}{bits}"] = lambda p, bits=bits: st.AdamW(
            p, lr=1e-3, state_bits=bits, weight_update="eco", rounding="stochastic")
    # SGD with momentum 0.9 (float32 parameters, then FP8 weights with ECO), against the same
    # fused AdamW yardstick
    configs["torch SGD fused"] = lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, fused=True)
    for bits in [32, 8, 4]:
        configs[f"st.SGD momentum {bits}-bit"] = lambda p, bits=bits: st.SGD(
            p, lr=1e-3, momentum=0.9, state_bits=bits)
    for bits in [32, 4]:
        configs[f"st.SGD{FLOAT8_MARK}{bits}-bit"] = lambda p, bits=bits: st.SGD(
            p, lr=1e-3, momentum=0.9, state_bits=bits, rounding="stochastic")
    return configs | peers()


BASELINE = "torch AdamW fused"  # measured first; then one of its steps precedes each timed step of the others
FLOAT8_MARK = " FP8 + ECO (SR) "  # in the names of configurations whose parameter is an FP8 QuantizedWeight
VERSUS = "torchao AdamW4bit"  # the peer whose step the slimtrain configurations are compared with by default


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on float32 tensors of COPY_NUMEL (bytes read plus written)."""
    src, dst = torch.rand(COPY_NUMEL, device=device), torch.empty(COPY_NUMEL, device=device)
    dst.copy_(src)
    best = min(_seconds(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * 4 * COPY_NUMEL / best / 1e9


def _seconds(action: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``action``, including the device work it queued."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    action()
    synchronize()
    return time.perf_counter() - start


def measure(name: str, make: Callable, numel: int, warmup: int, steps: int, device: torch.device,
            baseline: Callable[[], object] | None = None) -> tuple[dict, Callable[[], object]]:
    """Step time, first-step time and traffic of one configuration (see the module docstring),
    and its optimizer's step. With a ``baseline`` step (fused AdamW's), each timed step is paired
    with one of the baseline timed just before it: the ratio reported is the median of the pairs'
    ratios, so that the machine's drift between configurations cancels (1.0 without one). Each
    timed step, of either, directly follows an untimed step of the same optimizer, so that both
    find the caches as a loop of their own steps leaves them (tensors that fit in the caches
    would otherwise be timed cold after the other's step, and only the baseline's would be)."""
    torch.manual_seed(0)
    weight = torch.randn(numel // 1024, 1024, device=device)
    if FLOAT8_MARK in name:
        weight = st.QuantizedWeight.from_float(weight, st.WeightFormat("fp8_e4m3", "row"))
    param = torch.nn.Parameter(weight)
    param.grad = torch.randn(param.shape, device=device) * 1e-2
    optimizer = make([param])
    first = _seconds(optimizer.step, device)
    for _ in range(warmup - 1):
        optimizer.step()
    times, ratios = [], []
    for _ in range(steps):  # each timed step follows an untimed one of its own (caches as in a loop)
        reference = None
        if baseline:
            baseline()
            reference = _seconds(baseline, device)
            optimizer.step()
        times.append(_seconds(optimizer.step, device))
        ratios.append(times[-1] / reference if reference else 1.0)
    step = statistics.median(times)
    report = st.memory_report([param], optimizer)
    state = report.per_parameter("optimizer_state")
    stored = report.per_parameter("parameters")
    moved = 2 * stored + param.grad.element_size() + 2 * state  # param and states read + written
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else 3 * ratios
    row = dict(name=name, numel=param.numel(), step_ms=step * 1e3, ratio_to_fused=statistics.median(ratios),
               ratio_low=low, ratio_high=high, first_step_ms=first * 1e3, state_bytes_per_param=state,
               bytes_moved_per_param=moved, bandwidth_gbs=moved * param.numel() / step / 1e9)
    return row, optimizer.step


def run_bench(sizes: list[int], steps: int = 5, warmup: int = 3, only: list[str] | None = None,
              progress: Callable[[BenchResult], None] | None = None, device: str = "cpu",
              also: tuple[str, ...] = ()) -> dict:
    """Measure every configuration (those whose name contains one of ``only`` or is one of
    ``also``, plus the fused baseline, measured first and then paired with every timed step of the
    others) at each size in ``sizes`` (elements, rounded down to a multiple of 1024) on ``device``
    ("cpu" or "cuda")."""
    target = torch.device(device)
    configs = configurations()
    if only:
        if not any(s in k for s in only for k in configs):
            raise ValueError(f"--only {' '.join(map(repr, only))} matches no configuration of this "
                             f"machine: {', '.join(configs)}")
        configs = {k: v for k, v in configs.items()
                   if k == BASELINE or k in also or any(s in k for s in only)}
    if target.type == "cpu":
        kernels.cpu_kernels()  # build (or load) the kernels before timing: reported as compile cost
    copy = copy_bandwidth(target)
    peer_names, failed = set(peers()), {}
    results = []
    for size in sizes:
        baseline = None
        for name, make in configs.items():
            try:
                row, step = measure(name, make, max(1024, size // 1024 * 1024), warmup, steps, target,
                                    baseline)
            except Exception as error:  # a peer that cannot run here must not end the benchmark
                if name not in peer_names:
                    raise
                failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                continue
            baseline = baseline or step
            result = BenchResult(**row, fraction_of_copy=row["bandwidth_gbs"] / copy)
            results.append(result)
            if progress:
                progress(result)
    return dict(torch=torch.__version__, device=device_name(target), threads=torch.get_num_threads(),
                copy_bandwidth_gbs=copy, failed_peers=failed,
                kernel_compile_seconds=kernels.compile_seconds,
                triton_kernels=kernels.triton_status() if target.type == "cuda" else None,
                results=[asdict(r) for r in results])


def speedups(results: list[dict], versus: str) -> list[dict]:
    """How many times faster than configuration ``versus`` each slimtrain configuration stepped,
    size by size: the ratio of their ratios to the fused baseline (both paired with fused steps,
    so that a shared machine's drifts between the two cancel). Empty where ``versus`` was not
    measured. Rows of ``results`` as in run_bench's report."""
    peer = {r["numel"]: r["ratio_to_fused"] for r in results if r["name"] == versus}
    return [dict(name=r["name"], numel=r["numel"], speedup=peer[r["numel"]] / r["ratio_to_fused"])
            for r in results if r["name"].startswith("st.") and r["numel"] in peer]


def device_name(device: torch.device) -> str:
    """What ``device`` is, in words: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


BENCH_HEADER = (f"{'configuration':<34}{'params':>11}{'step ms':>10}{'x fused':>9}{'quartiles':>16}"
                f"{'first ms':>10}{'state B/p':>11}{'moved B/p':>11}{'GB/s':>8}{'of copy':>9}")


def format_row(r: BenchResult) -> str:
    """One line of the bench table (see BENCH_HEADER)."""
    quartiles = f"{r.ratio_low:.2f}-{r.ratio_high:.2f}"
    return (f"{r.name:<34}{r.numel:>11,}{r.step_ms:>10.1f}{r.ratio_to_fused:>9.2f} {quartiles:>15}"
            f"{r.first_step_ms:>10.0f}"
            f"{r.state_bytes_per_param:>11.3f}{r.bytes_moved_per_param:>11.2f}{r.bandwidth_gbs:>8.1f}"
            f"{r.fraction_of_copy:>9.0%}")
