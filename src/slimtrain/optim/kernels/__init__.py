"""Hand-written kernels: in C for the CPU, compiled with the system C compiler on first use, and in
Triton for CUDA (:mod:`slimtrain.optim.kernels.triton_adamw`, where Triton is installed).

The shared library is cached under ``cache_dir()/kernels`` by a hash of the source, the compiler
flags and the CPU, so a machine compiles it once (about 5 s). When no compiler is found or
compilation fails, :func:`cpu_kernels` returns None and slimtrain runs the equivalent eager torch
code (one warning says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimtrain.optim.state import StateFormat
from slimtrain.paths import cache_dir
from slimtrain.quant import block_count, codebook
from slimtrain.quant.formats import format_max
from slimtrain.quant.rounding import midpoints, noise_key
from slimtrain.weights.tensor import QuantizedWeight, WeightFormat, is_low_precision

SOURCE = Path(__file__).with_name("adamw_cpu.c")
# -ffp-contract=off: no fused multiply-add, so that every operation rounds as the eager step's does;
# -fno-trapping-math lets branch-free selects vectorize (it changes no result); -fopenmp links
# libgomp, the one torch loads, so that the kernels' threads are torch's (dropped, and the parts of
# a step run one after another, where the compiler has no OpenMP)
OPENMP = "-fopenmp"
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=c11", OPENMP)
MARCH_VARIABLE = "SLIMTRAIN_KERNEL_MARCH"  # gcc's -march: "native" (default) or e.g. "x86-64"


def compiler_flags() -> tuple[str, ...]:
    """FLAGS and the target instruction set: this CPU's, unless $SLIMTRAIN_KERNEL_MARCH names
    another (every target gives the same bits; only the speed differs)."""
    return (*FLAGS, f"-march={os.environ.get(MARCH_VARIABLE) or 'native'}")

_loaded: ctypes.CDLL | None = None
_failed = False
compile_seconds: float | None = None  # time spent compiling in this process (None: cached or not built)


def _cpu_signature() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def library_path() -> Path:
    """Where the compiled kernels of this source, flags and CPU are cached."""
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(compiler_flags()).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"adamw_cpu-{digest}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for flags in (compiler_flags(), tuple(f for f in compiler_flags() if f != OPENMP)):
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                break
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: concurrent processes never load a partial file


def cpu_kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None if it cannot be built or loaded."""
    global _loaded, _failed, compile_seconds
    if _loaded is not None or _failed:
        return _loaded
    if os.environ.get("SLIMTRAIN_NO_KERNELS"):
        _failed = True
        return None
    try:
        target = library_path()
        if not target.exists():
            start = time.perf_counter()
            _build(target)
            compile_seconds = time.perf_counter() - start
        _loaded = ctypes.CDLL(str(target))
    except OSError as error:
        warnings.warn(f"slimtrain's C kernels are unavailable ({error}); optimizer steps on the CPU "
                      "run as eager torch code", RuntimeWarning, stacklevel=2)
        _failed = True
        return None
    _declare(_loaded)
    return _loaded


TRITON_DEVICES = {"cuda"}  # where the Triton kernels run (tests add "cpu" under Triton's interpreter)
_triton: Any = None  # the Triton kernels' module once imported; False where unusable
triton_failure: str | None = None  # why the Triton kernels were turned off
triton_steps = 0  # steps the Triton kernels took in this process


def triton_kernels() -> Any:
    """The Triton kernels' module, or None where Triton is not installed or a kernel failed."""
    global _triton
    if _triton is None:
        try:
            from slimtrain.optim.kernels import triton_adamw
        except ImportError:
            _triton = False
        else:
            _triton = triton_adamw
    return _triton or None


def disable_triton(error: Exception) -> None:
    """Stop using the Triton kernels, with one warning: one failed to compile or launch."""
    global _triton, triton_failure
    _triton, triton_failure = False, f"{type(error).__name__}: {error}"
    warnings.warn(f"slimtrain's Triton kernel failed ({triton_failure}); the steps it covered go "
                  "through torch.compile from now on", RuntimeWarning, stacklevel=4)


def triton_status() -> str:
    """What the Triton kernels did in this process, for reports: took N steps, failed (why), or
    are not installed."""
    if triton_failure is not None:
        return f"failed after {triton_steps} steps ({triton_failure}); torch.compile took their steps"
    if triton_kernels() is None:
        return "not installed (torch.compile takes their steps)"
    return f"took {triton_steps} steps"


KIND_FLOAT, KIND_CODEBOOK, KIND_LOG = 0, 1, 2


class StateArgs(ctypes.Structure):
    """Mirror of ``state_t`` in adamw_cpu.c."""

    _fields_ = [
        ("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("stochastic", ctypes.c_int32),
        ("key", ctypes.c_uint32), ("quantile", ctypes.c_float),
        ("values", ctypes.c_void_p), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
        ("levels", ctypes.c_void_p), ("mids", ctypes.c_void_p),
    ]


class AdamWScalars(ctypes.Structure):
    """Mirror of ``adamw_scalars_t`` in adamw_cpu.c (float32 values, as torch rounds them)."""

    _fields_ = [
        ("decay", ctypes.c_float), ("lerp_weight", ctypes.c_float), ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float), ("eps", ctypes.c_float),
        ("inverse_bias_correction2_sqrt", ctypes.c_float), ("neg_step_size", ctypes.c_float),
        ("maximize", ctypes.c_int32),
    ]


class SGDScalars(ctypes.Structure):
    """Mirror of ``sgd_scalars_t`` in adamw_cpu.c (float32 values, as torch rounds them)."""

    _fields_ = [
        ("neg_lr", ctypes.c_float), ("momentum", ctypes.c_float),
        ("one_minus_dampening", ctypes.c_float), ("weight_decay", ctypes.c_float),
        ("nesterov", ctypes.c_int32), ("maximize", ctypes.c_int32), ("first", ctypes.c_int32),
    ]


def _declare(library: ctypes.CDLL) -> None:
    library.adamw_step_blocks.restype = ctypes.c_int
    library.adamw_step_blocks.argtypes = [
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.POINTER(StateArgs), ctypes.POINTER(StateArgs),
        ctypes.POINTER(AdamWScalars),
    ]
    library.sgd_step_blocks.restype = ctypes.c_int
    library.sgd_step_blocks.argtypes = [
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.POINTER(StateArgs), ctypes.POINTER(SGDScalars),
    ]
    library.sgd_step_weight_rows.restype = ctypes.c_int
    library.sgd_step_weight_rows.argtypes = [
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.POINTER(WeightArgs), ctypes.c_void_p, ctypes.POINTER(StateArgs), ctypes.POINTER(SGDScalars),
    ]
    library.float8_stochastic_codes.restype = None
    library.float8_stochastic_codes.argtypes = [
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
        ctypes.c_float, ctypes.c_void_p,
    ]
    library.search_lanes.restype = ctypes.c_int
    library.search_lanes.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_void_p]
    library.elementary_lanes.restype = None
    library.elementary_lanes.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    library.adamw_step_weight_rows.restype = ctypes.c_int
    library.adamw_step_weight_rows.argtypes = [
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.POINTER(WeightArgs), ctypes.c_void_p, ctypes.POINTER(StateArgs),
        ctypes.POINTER(StateArgs), ctypes.POINTER(AdamWScalars),
    ]


def state_args(state: dict, name: str, fmt: StateFormat, seed: int | None,
               keep_alive: list) -> StateArgs:
    """The ``state_t`` of state ``name`` stored in ``fmt`` (``keep_alive`` collects the tables
    the kernel reads, to outlive the call)."""
    key = noise_key(seed) if seed is not None and fmt.stochastic else 0
    if not fmt.quantized:
        return StateArgs(kind=KIND_FLOAT, values=state[name].data_ptr())
    codes, scales = state[name + "_codes"], state[name + "_scales"]
    args = StateArgs(kind=KIND_LOG if fmt.kind == "log" else KIND_CODEBOOK, bits=fmt.bits,
                     stochastic=int(fmt.stochastic), key=key, quantile=fmt.quantile,
                     codes=codes.data_ptr(), scales=scales.data_ptr())
    if fmt.kind != "log":
        levels = codebook(fmt.kind, fmt.bits, fmt.signed)
        mids = midpoints(levels)
        keep_alive += [levels, mids]
        args.levels, args.mids = levels.data_ptr(), mids.data_ptr()
    return args


def supported(fmt: StateFormat) -> bool:
    """Whether the kernels read and write states stored in ``fmt`` (all but bfloat16)."""
    return fmt.bits == 32 or fmt.quantized


class WeightArgs(ctypes.Structure):
    """Mirror of ``weight_t`` in adamw_cpu.c."""

    _fields_ = [
        ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("group", ctypes.c_int64),
        ("format", ctypes.c_int32), ("mantissa_bits", ctypes.c_int32), ("exponent_bias", ctypes.c_int32),
        ("max", ctypes.c_float), ("stochastic", ctypes.c_int32), ("key", ctypes.c_uint32),
        ("eco", ctypes.c_int32), ("eco_scale", ctypes.c_float), ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
    ]


FLOAT8_LAYOUTS = {"fp8_e4m3": (3, 7), "fp8_e5m2": (2, 15)}  # (mantissa bits, exponent bias)
WEIGHT_FLOAT8, WEIGHT_INT8, WEIGHT_INT4 = 0, 1, 2
WEIGHT_KINDS = {"fp8_e4m3": WEIGHT_FLOAT8, "fp8_e5m2": WEIGHT_FLOAT8, "int8": WEIGHT_INT8,
                "int4": WEIGHT_INT4}
MAX_UNIT = 2**20  # elements of the kernel's unit of work: whole rows and whole state blocks


def rows_per_unit(cols: int, block_size: int) -> int:
    """Rows of the smallest run of whole rows that is also a run of whole blocks."""
    return math.lcm(cols, block_size) // cols


def scale_group(format: WeightFormat, cols: int) -> int:
    """Elements of a row that share one scale: the row, or a group of it."""
    return format.group_size if format.granularity == "group" else cols


def weight_supported(format: WeightFormat, shape: torch.Size, block_size: int,
                     weight_update: str | None) -> bool:
    """Whether the kernel updates a weight of ``format`` and ``shape``: float8, int8 or int4 codes
    with row or group scales (int4: groups of a multiple of 8 elements), "eco" or "naive"
    updates, units of whole rows and blocks of at most MAX_UNIT elements."""
    if (format.fmt not in WEIGHT_KINDS or format.granularity not in ("row", "group") or len(shape) != 2
            or weight_update not in ("eco", "naive")):
        return False
    cols, group = shape[1], scale_group(format, shape[1])
    return (cols % group == 0 and (format.fmt != "int4" or group % 8 == 0)
            and math.lcm(cols, block_size) <= MAX_UNIT)


def weight_args(weight: QuantizedWeight, seed: int | None, eco: bool, eco_scale: float) -> WeightArgs:
    """The ``weight_t`` of a QuantizedWeight (``seed``: stochastic rounding)."""
    fmt = weight.format.fmt
    mantissa_bits, bias = FLOAT8_LAYOUTS.get(fmt, (0, 0))
    return WeightArgs(
        rows=weight.shape[0], cols=weight.shape[1], group=scale_group(weight.format, weight.shape[1]),
        format=WEIGHT_KINDS[fmt], mantissa_bits=mantissa_bits, exponent_bias=bias, max=format_max(fmt),
        stochastic=int(seed is not None), key=0 if seed is None else noise_key(seed), eco=int(eco),
        eco_scale=eco_scale, codes=weight.codes.data_ptr(), scales=weight.scales.data_ptr(),
    )


MOST_BLOCK_SIZE = 65536  # the largest block the C kernels' workspace takes


def layout_of(param: torch.Tensor, block_size: int, weight_update: str | None) -> str | None:
    """How the CPU kernels step ``param`` (its gradient float32): "weight" (a QuantizedWeight whose
    format and shape they support), "blocks" (a contiguous float32 tensor), or None (they do not,
    or the block is larger than MOST_BLOCK_SIZE)."""
    if param.device.type != "cpu" or param.grad.dtype != torch.float32 or block_size > MOST_BLOCK_SIZE:
        return None
    if isinstance(param, QuantizedWeight) and weight_supported(param.format, param.shape, block_size,
                                                                weight_update):
        return "weight"
    if param.dtype != torch.float32 or not param.is_contiguous() or is_low_precision(param):
        return None
    return "blocks"


def c_kernel_step(param: torch.Tensor, kernel_names: tuple[str, str], state: dict,
                  formats: dict[str, StateFormat], seeds: dict[str, int | None], weight_update: str | None,
                  weight_seed: int | None, eco_scale: float, scalars: Callable[[], ctypes.Structure]) -> bool:
    """Step ``param`` in the C kernels named ``kernel_names`` (the blocks one, the weight one) with
    its states stored in ``formats`` (in the kernel's order, one block size) and the rule's
    scalars (made by ``scalars`` only when the kernels take the step); False, touching nothing,
    where they do not take it (see :func:`layout_of`) or could not be built."""
    block_size = next(iter(formats.values())).block_size
    layout = layout_of(param, block_size, weight_update)
    library = cpu_kernels() if layout else None
    if library is None:
        return False
    keep_alive: list = []  # what the kernel reads, alive until it returns
    args = [ctypes.byref(state_args(state, name, fmt, seeds[name], keep_alive))
            for name, fmt in formats.items()] + [ctypes.byref(scalars())]
    grad = param.grad.contiguous()
    blocks_kernel, weight_kernel = (getattr(library, name) for name in kernel_names)
    if layout == "weight":
        weight = weight_args(param, weight_seed, weight_update == "eco", eco_scale)
        per_unit = rows_per_unit(param.shape[1], block_size)
        run_blocks(weight_kernel, per_unit, block_size, ctypes.byref(weight), grad.data_ptr(), *args,
                   units=block_count(param.shape[0], per_unit))
    else:
        run_blocks(blocks_kernel, param.numel(), block_size, param.data_ptr(), grad.data_ptr(), *args)
    return True


MIN_BLOCKS_PER_THREAD = 64


def run_blocks(kernel: Callable[..., int], size: int, block_size: int, *args: Any,
               units: int | None = None) -> None:
    """Call ``kernel(threads, size, block_size, 0, units, *args)`` over the blocks of a tensor of
    ``size`` elements, or over ``units`` units of ``size`` elements (weight rows: ``size`` is then
    rows per unit); the kernel splits them across ``threads`` (``torch.get_num_threads()``, fewer
    for small tensors) OpenMP threads, torch's own. ctypes releases the GIL during the call."""
    blocks = block_count(size, block_size) if units is None else units * size // block_size
    units = block_count(size, block_size) if units is None else units
    threads = max(1, min(torch.get_num_threads(), blocks // MIN_BLOCKS_PER_THREAD, units))
    status = kernel(threads, size, block_size, 0, units, *args)
    if status == 2:
        raise MemoryError("the C kernel could not allocate its workspace")
    if status == 3:
        raise ValueError("the C kernel cannot search this codebook: its levels must lie in [-1, 1], "
                         "neighbours at least 1/256 of their magnitude apart")
    if status:
        raise ValueError(f"kernel rejected block_size={block_size}: a multiple of 8 up to {MOST_BLOCK_SIZE} "
                         "(that divides the rows of a quantized weight, whose scale groups divide its rows)")
