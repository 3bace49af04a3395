"""The C kernel of the fused AdamW step gives the same bits as the eager torch step."""

import contextlib
import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as hypothesis_st

import slimtrain as st
from slimtrain.optim import kernels
from slimtrain.quant import elementary
from slimtrain.quant.formats import _FLOAT8, _float8_stochastic, format_max


def run(fused: bool, shape, steps: int = 4, device: str = "cpu", optimizer=st.AdamW, **options):
    """``steps`` steps of ``optimizer`` (st.AdamW) on one parameter; the same data on every device."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape).to(device))
    generator = torch.Generator().manual_seed(3)
    opt = optimizer([param], lr=1e-2, seed=1, compile=fused, min_quantized_numel=0, **options)
    for _ in range(steps):
        param.grad = torch.randn(shape, generator=generator).to(device)
        opt.step()
    return param.detach(), opt.state[param]


@contextlib.contextmanager
def kernel_steps():
    """What kernels.c_kernel_step returned while the block ran (True: the C kernel took a step)."""
    taken, original = [], kernels.c_kernel_step
    kernels.c_kernel_step = lambda *args: taken.append(original(*args)) or taken[-1]
    try:
        yield taken
    finally:
        kernels.c_kernel_step = original


def test_kernel_builds_here():
    assert kernels.cpu_kernels() is not None, "gcc is on every machine this project runs tests on"


CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="stochastic"),
    dict(state_bits=(3, 3), state_rounding="nearest"),
    dict(state_bits=(8, 8), state_maps=("linear", "dynamic")),
    dict(state_bits=(32, 2), maximize=True, betas=(0.4, 0.99)),
    dict(state_bits=(4, 32), block_size=64, weight_decay=0.3),
    dict(state_bits=(8, 4), quantile=0.3, block_size=8, eps=1e-3),
    dict(state_bits=(8, 2), state_rounding="stochastic"),  # m rounded stochastically, 256 levels
    dict(state_bits=(4, 3), state_rounding=("stochastic", "nearest")),
]


@pytest.mark.parametrize("options", CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("shape", [(300, 70), (4097,), (3, 5, 61)])
def test_kernel_and_eager_agree_bit_for_bit(options, shape):
    with kernel_steps() as taken:
        fused_param, fused_state = run(True, shape, **options)
        assert taken == [True] * 4  # the C kernel took every step
        eager_param, eager_state = run(False, shape, **options)
        assert len(taken) == 4
    assert torch.equal(fused_param, eager_param)
    assert fused_state.keys() == eager_state.keys()
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


SGD_CONFIGURATIONS = [
    dict(momentum=0.9, state_bits=4),
    dict(momentum=0.9, state_bits=2, state_rounding="stochastic"),
    dict(momentum=0.8, state_bits=8, nesterov=True, weight_decay=0.1),
    dict(momentum=0.9, dampening=0.3, state_bits=3, maximize=True, state_maps="linear", block_size=64),
]


@pytest.mark.parametrize("options", SGD_CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("shape", [(300, 70), (4097,), (3, 5, 61)])
def test_sgd_kernel_and_eager_agree_bit_for_bit(monkeypatch, options, shape):
    """SGD's quantized momentum buffer steps in the C kernel (every step: counted) with the bits
    of the eager step, the first step (the buffer becomes the gradient) included."""
    calls, original = [], kernels.state_args
    monkeypatch.setattr(kernels, "state_args", lambda *a: calls.append(a) or original(*a))
    fused_param, fused_state = run(True, shape, optimizer=st.SGD, **options)
    assert len(calls) == 4
    eager_param, eager_state = run(False, shape, optimizer=st.SGD, **options)
    assert len(calls) == 4
    assert torch.equal(fused_param, eager_param)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


def assert_same_bits(results) -> None:
    """The kernel's (parameter, state) and the eager step's, in that order, hold the same bits."""
    (fused_param, fused_state), (eager_param, eager_state) = results
    assert torch.equal(fused_param, eager_param)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


def test_kernel_and_eager_agree_on_blocks_of_subnormal_moments():
    """A block of gradients around 1e-38 gives m a subnormal absmax, whose reciprocal overflows
    float32 (both paths scale such a block by 2^24 first)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(4, 128))
        opt = st.AdamW([param], lr=1e-2, compile=fused, min_quantized_numel=0, state_bits=(4, 2))
        grad = torch.randn(4, 128)
        grad[0] *= 1e-38
        grad[1, ::2] = 0.0
        grad[1] *= 1e-39
        param.grad = grad
        opt.step()
        results.append((param.detach().clone(), opt.state[param]))
    assert_same_bits(results)
    eager_state = results[1][1]
    m = st.quant.dequantize_absmax(eager_state["exp_avg_codes"], eager_state["exp_avg_scales"], 4, 512)
    assert torch.isfinite(m).all() and (m.view(4, 128)[1, ::2] == 0).all()  # zeros stay zeros


@pytest.mark.parametrize("bits", [(8, 8), (2, 8)])
def test_kernel_and_eager_agree_where_v_spans_float32s_whole_range(bits):
    """Blocks whose second moments run from subnormals to 1e35 (and one that saturates): the
    8-bit logarithmic decode's levels reach both ends of exp2's range, where the kernel
    leaves its one-scaling path."""
    results = []
    for fused in (True, False):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 512))
        opt = st.AdamW([param], lr=1e-2, compile=fused, min_quantized_numel=0, state_bits=bits, seed=2)
        magnitudes = torch.logspace(-22, 19, 256)  # squares * (1 - beta2): 1e-47 (0) to 1e35
        grad = torch.cat([magnitudes, -magnitudes.flip(0)])
        grad[-8:] = 3e22  # a block whose v saturates at float32's largest value
        for scale in (1.0, 0.5, 2.0):
            param.grad = grad * scale
            opt.step()
        results.append((param.detach().clone(), opt.state[param]))
    assert_same_bits(results)


gradients = hypothesis_st.lists(hypothesis_st.floats(-2.0**100, 2.0**100, width=32), min_size=1, max_size=400)


@settings(max_examples=60, deadline=None)
@given(grads=gradients, bits=hypothesis_st.sampled_from([(4, 2), (2, 2), (3, 8), (8, 8)]),
       block=hypothesis_st.sampled_from([8, 32, 40, 128]))
@example(grads=[0.0] * 7 + [1e-39], bits=(4, 2), block=8)
def test_kernel_and_eager_agree_on_any_gradients(grads, bits, block):
    """Zeros, subnormals and values up to 2^100 (whose squares overflow float32: v saturates), any
    length and block size: the same bits, and finite parameters."""
    results = []
    for fused in (True, False):
        param = torch.nn.Parameter(torch.linspace(-1, 1, len(grads)))
        opt = st.AdamW([param], lr=1e-2, compile=fused, min_quantized_numel=0, state_bits=bits,
                       block_size=block, seed=3)
        with kernel_steps() as taken:
            for scale in (1.0, -0.5):
                param.grad = torch.tensor(grads) * scale
                opt.step()
        assert taken == [True] * 2 * fused
        results.append((param.detach().clone(), opt.state[param]))
    assert_same_bits(results)
    assert torch.isfinite(results[0][0]).all()


@settings(max_examples=40, deadline=None)
@given(rows=hypothesis_st.integers(1, 6), cols=hypothesis_st.sampled_from([8, 40, 64, 96]),
       fmt=hypothesis_st.sampled_from(["fp8_e4m3", "fp8_e5m2", "int8", "int4"]),
       exponent=hypothesis_st.integers(-140, 40), seed=hypothesis_st.integers(0, 2**16),
       rounding=hypothesis_st.sampled_from(["nearest", "stochastic"]))
def test_weight_kernel_and_eager_agree_on_any_weights(rows, cols, fmt, exponent, seed, rounding):
    """Quantized weights with a zero row, gradients from 2^-140 (subnormal) to 2^40."""
    granularity = "group" if fmt == "int4" and cols % 32 == 0 else "row"
    results = []
    for fused in (True, False):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn(rows, cols, generator=generator) * 0.05
        start[0] = 0.0
        weight = st.QuantizedWeight.from_float(start, st.WeightFormat(fmt, granularity, 32))
        param = torch.nn.Parameter(weight)
        opt = st.AdamW([param], lr=1e-2, compile=fused, min_quantized_numel=0, state_bits=(4, 2),
                       block_size=8, rounding=rounding, seed=seed)
        for _ in range(2):
            param.grad = torch.randn(rows, cols, generator=generator) * 2.0**exponent
            opt.step()
        results.append((param.codes.view(torch.uint8).clone(), param.scales.clone(), opt.state[param]))
    (codes, scales, state), (eager_codes, eager_scales, eager_state) = results
    assert torch.equal(codes, eager_codes) and torch.equal(scales, eager_scales)
    assert torch.isfinite(scales).all()
    for key in state:
        assert torch.equal(state[key], eager_state[key]), key


def test_kernel_keeps_nan_out_of_finite_steps():
    param, state = run(True, (64, 64), steps=3, state_bits=(2, 2), eps=0.0)
    assert torch.isfinite(param).all()
    assert torch.isfinite(state["exp_avg_sq_scales"]).all()


def test_threads_split_blocks_without_changing_results():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(True, (1024, 129), state_bits=(4, 2))[0]
        torch.set_num_threads(2)
        several = run(True, (1024, 129), state_bits=(4, 2))[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, several)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_kernel_threads_are_torchs_own():
    """The library links libgomp, and the process loads it once, torch's: the kernels' threads are
    the workers torch's parallel ops use, not a second pool competing with them for the cores."""
    library = kernels.cpu_kernels()
    assert library is not None
    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(loaded) == 1, loaded
    linked = subprocess.run(["ldd", library._name], capture_output=True, text=True).stdout
    assert "libgomp" in linked


def test_kernel_builds_without_openmp_and_gives_the_same_bits(monkeypatch, tmp_path):
    """A compiler that rejects -fopenmp still builds the library (its parts then run one after
    another), and the step keeps its bits with two threads asked for."""
    bogus = "-fno-such-openmp-flag"
    monkeypatch.setattr(kernels, "OPENMP", bogus)
    monkeypatch.setattr(kernels, "FLAGS", tuple(bogus if f == "-fopenmp" else f for f in kernels.FLAGS))
    target = tmp_path / "serial.so"
    kernels._build(target)
    assert "libgomp" not in subprocess.run(["ldd", str(target)], capture_output=True, text=True).stdout
    serial = ctypes.CDLL(str(target))
    kernels._declare(serial)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(kernels, "_loaded", serial)
        fused = run(True, (1024, 129), state_bits=(4, 2))
    finally:
        torch.set_num_threads(threads)
    eager = run(False, (1024, 129), state_bits=(4, 2))
    assert torch.equal(fused[0], eager[0])
    for key in eager[1]:
        assert torch.equal(fused[1][key], eager[1][key]), key


def run_weight(fused: bool, shape, fmt: str = "fp8_e4m3", steps: int = 4, device: str = "cpu",
               granularity: str = "row", group_size: int = 32, optimizer=st.AdamW, **options):
    """As :func:`run` for a quantized weight (float8 with row scales by default)."""
    torch.manual_seed(0)
    start = (torch.randn(shape) * 0.05).to(device)
    weight = st.QuantizedWeight.from_float(start, st.WeightFormat(fmt, granularity, group_size))
    param = torch.nn.Parameter(weight)
    generator = torch.Generator().manual_seed(3)
    opt = optimizer([param], lr=1e-2, seed=1, compile=fused, min_quantized_numel=0, **options)
    for _ in range(steps):
        param.grad = (torch.randn(shape, generator=generator) * 0.1).to(device)
        opt.step()
    return param, opt.state[param]


FLOAT8_CONFIGURATIONS = [
    dict(state_bits=(4, 2), rounding="stochastic"),  # the slim recipe
    dict(state_bits=(4, 2), rounding="nearest"),
    dict(state_bits=(32, 32), rounding="stochastic"),  # eco-sr
    dict(state_bits=(2, 2), weight_update="naive", rounding="nearest"),
    dict(state_bits=(8, 3), weight_update="naive", rounding="stochastic", maximize=True),
    dict(state_bits=(4, 2), fmt="fp8_e5m2", weight_decay=0.5),
    dict(state_bits=(4, 2), block_size=32),
]


@pytest.mark.parametrize("options", FLOAT8_CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("shape", [(64, 256), (77, 192), (5, 1000), (40, 61)])
def test_float8_weight_kernel_and_eager_agree_bit_for_bit(options, shape):
    """Rows of 192, 1000 or 61 elements: state blocks of 128 span rows (units of whole rows and
    blocks), and rows of 61 end inside an 8-lane vector."""
    options = dict(options)
    fmt = options.pop("fmt", "fp8_e4m3")
    fused, fused_state = run_weight(True, shape, fmt, **options)
    eager, eager_state = run_weight(False, shape, fmt, **options)
    assert torch.equal(fused.codes.view(torch.uint8), eager.codes.view(torch.uint8))
    assert torch.equal(fused.scales, eager.scales)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


SGD_WEIGHT_CONFIGURATIONS = [
    dict(momentum=0.9, state_bits=32, rounding="stochastic"),  # ECO with a float32 buffer
    dict(momentum=0.9, state_bits=4, rounding="nearest"),
    dict(momentum=0.9, state_bits=2, rounding="stochastic", weight_decay=0.1, maximize=True),
    dict(momentum=0.9, state_bits=8, nesterov=True, weight_update="naive", rounding="stochastic"),
    dict(fmt="int4", granularity="group", momentum=0.9, state_bits=4, rounding="stochastic", dampening=0.2),
]


@pytest.mark.parametrize("options", SGD_WEIGHT_CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("shape", [(64, 256), (77, 192), (40, 64)])
def test_sgd_weight_kernel_and_eager_agree_bit_for_bit(monkeypatch, options, shape):
    """SGD's step of FP8 / INT4 weights (ECO or naive) in the C kernel, every step (counted): the
    bits of the eager step."""
    options = dict(options)
    fmt, granularity = options.pop("fmt", "fp8_e4m3"), options.pop("granularity", "row")
    calls, original = [], kernels.weight_args
    monkeypatch.setattr(kernels, "weight_args", lambda *a: calls.append(a) or original(*a))
    fused, fused_state = run_weight(True, shape, fmt, granularity=granularity, optimizer=st.SGD, **options)
    assert len(calls) == 4
    eager, eager_state = run_weight(False, shape, fmt, granularity=granularity, optimizer=st.SGD, **options)
    assert torch.equal(fused.codes.view(torch.uint8), eager.codes.view(torch.uint8))
    assert torch.equal(fused.scales, eager.scales)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


INTEGER_CONFIGURATIONS = [
    dict(fmt="int4", granularity="group", state_bits=(4, 2), rounding="stochastic"),  # int4-eco
    dict(fmt="int4", granularity="group", group_size=64, state_bits=(4, 2), rounding="nearest"),
    dict(fmt="int4", state_bits=(2, 2), weight_update="naive", rounding="stochastic"),
    dict(fmt="int8", state_bits=(4, 2), rounding="stochastic", weight_decay=0.5),
    dict(fmt="int8", granularity="group", group_size=32, state_bits=(32, 32), rounding="nearest"),
]


@pytest.mark.parametrize("options", INTEGER_CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("shape", [(64, 256), (77, 192), (9, 64)])
def test_integer_weight_kernel_and_eager_agree_bit_for_bit(options, shape):
    """INT8 / INT4 codes with row or group scales (rows of 64: two rows per state block)."""
    fused, fused_state = run_weight(True, shape, **options)
    eager, eager_state = run_weight(False, shape, **options)
    assert torch.equal(fused.codes.view(torch.uint8), eager.codes.view(torch.uint8))
    assert torch.equal(fused.scales, eager.scales)
    for key in fused_state:
        assert torch.equal(fused_state[key], eager_state[key]), key


@pytest.mark.parametrize("options", [dict(), dict(fmt="int4", granularity="group"),
                                     dict(state_bits=(32, 32))], ids=str)
def test_weight_kernel_is_the_path_taken(monkeypatch, options):
    """The fused step must not fall back to eager code for the slim and int4-eco recipes' weights,
    nor for quantized weights with float32 states."""
    calls, original = [], kernels.weight_args
    monkeypatch.setattr(kernels, "weight_args", lambda *a: calls.append(a) or original(*a))
    run_weight(True, (77, 192), steps=2, **{"state_bits": (4, 2), "rounding": "stochastic", **options})
    assert len(calls) == 2


@pytest.mark.parametrize("kernel, make", [
    ("_fused_adamw_", lambda p: st.AdamW(p, lr=1e-2)),
    ("_fused_sgd_", lambda p: st.SGD(p, lr=1e-2, momentum=0.9)),
    ("_fused_sgd_", lambda p: st.SGD(p, lr=1e-2)),
], ids=["adamw", "sgd-momentum", "sgd"])
def test_float32_states_take_torchs_fused_kernel(monkeypatch, kernel, make):
    calls, original = [], getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **k: calls.append(1) or original(*a, **k))
    param = torch.nn.Parameter(torch.randn(64, 80))
    optimizer = make([param])
    for _ in range(3):
        param.grad = torch.randn_like(param)
        optimizer.step()
    assert len(calls) == 3


DIGEST_SCRIPT = """
import hashlib, sys, torch
from tests.optim.test_kernels import run, run_weight
from slimtrain.optim import kernels
fused = sys.argv[1] == "fused"
assert not fused or kernels.cpu_kernels() is not None
digest = hashlib.sha256()
for options in ({"state_bits": (4, 2)}, {"state_bits": (3, 8), "state_rounding": "stochastic"},
                {"state_bits": (8, 2)},
                {"state_bits": (8, 8), "state_maps": ("dynamic", "dynamic"), "state_rounding": "stochastic"}):
    param, state = run(fused, (37, 129), **options)
    for tensor in (param, *state.values()):
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
for fmt, granularity, shape in (("fp8_e4m3", "row", (40, 61)), ("int4", "group", (40, 64))):
    weight, state = run_weight(fused, shape, fmt, granularity=granularity, state_bits=(2, 2),
                               rounding="stochastic")
    for tensor in (weight.codes.view(torch.uint8), weight.scales, *state.values()):
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
def test_every_instruction_set_gives_the_same_bits(tmp_path):
    """A build for plain x86-64 (no AVX: the kernel's fallback paths) and this CPU's build agree
    with the eager step, bit for bit."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def digest(mode: str, march: str) -> str:
        env = {**os.environ, "SLIMTRAIN_CACHE": str(tmp_path), kernels.MARCH_VARIABLE: march}
        result = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, mode], cwd=root, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    eager = digest("eager", "native")
    assert digest("fused", "x86-64") == eager
    assert digest("fused", "native") == eager


def float8_tie_cases(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, noise) where an integer float8 rounding and the eager float one could part: values
    exactly at and beside the midpoint of two codes, and noise exactly at and beside each
    threshold, for every pair of neighbouring normal codes (subnormal ones too), both signs, then
    the same shuffled (normal and subnormal values mixed)."""
    mantissa_bits, bias = kernels.FLOAT8_LAYOUTS[fmt]
    shift = 23 - mantissa_bits
    magnitudes = torch.arange(1, 0x80, dtype=torch.int32).to(torch.uint8).view(_FLOAT8[fmt]).float()
    lower = magnitudes[(magnitudes > 0) & (magnitudes < format_max(fmt))]
    ys, noises = [], []
    half = 1 << (shift - 1)
    for discarded in (0, 1, half - 1, half, half + 1, 2 * half - 1):
        y = (lower.view(torch.int32) + discarded).view(torch.float32)
        for threshold in (discarded << (24 - shift), ((1 << shift) - discarded) << (24 - shift)):
            for k in (threshold - 1, threshold, threshold + 1, 0, (1 << 24) - 1):
                k = min(max(k, 0), (1 << 24) - 1)
                for sign in (1.0, -1.0):
                    ys.append(sign * y)
                    noises.append(torch.full_like(y, k / 2**24))
    y, noise = torch.cat(ys), torch.cat(noises)
    shuffled = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(0))
    return torch.cat([y, y[shuffled]]), torch.cat([noise, noise[shuffled]])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_float8_stochastic_rounding_at_exact_ties(fmt):
    """The kernel's integer float8 rounding (subnormal values take its float path, alone and mixed
    into vectors with normal ones) against the eager float one at the points where they could part."""
    library = kernels.cpu_kernels()
    if library is None:
        pytest.skip("no C compiler")
    mantissa_bits, bias = kernels.FLOAT8_LAYOUTS[fmt]
    y, noise = float8_tie_cases(fmt)
    expected = _float8_stochastic(y, _FLOAT8[fmt], noise).view(torch.uint8)
    got = torch.empty(y.numel(), dtype=torch.uint8)
    library.float8_stochastic_codes(y.numel(), y.data_ptr(), noise.data_ptr(), mantissa_bits, bias,
                                    format_max(fmt), got.data_ptr())
    assert torch.equal(got, expected)


def elementary_inputs() -> torch.Tensor:
    """Where log2 and exp2 could go wrong: every exponent with mantissas at and beside sqrt(1/2)'s
    (where log2 takes the next exponent), uniform values in log2's and exp2's ranges, zeros,
    subnormals, negatives, infinities, NaN and exp2's range limits, alone and mixed into vectors
    of 8 ordinary values, and a partial last vector."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.arange(1, 255, dtype=torch.int32) << 23
    mantissas = torch.tensor([0, 1, 0x3504F2, 0x3504F3, 0x3504F4, 0x400000, 0x7FFFFF], dtype=torch.int32)
    ordinary = (exponents[:, None] | mantissas[None, :]).reshape(-1).view(torch.float32)
    uniform = torch.rand(4000, generator=generator)
    ordinary = torch.cat([ordinary, uniform * 300, uniform * 300 - 150])  # log2's, exp2's
    special = torch.tensor([0.0, -0.0, 1e-39, 1e-45, -1.0, float("inf"), float("-inf"), float("nan"),
                            -125.0, -125.5, 126.0, 126.5, -252.0, -252.5, 254.0, 254.5])
    subnormal = torch.tensor([0x007FFFFF, 0x00400000], dtype=torch.int32).view(torch.float32)
    special = torch.cat([special, subnormal])
    mixed = torch.linspace(1.0, 7.0, 8).repeat(special.numel(), 1)  # in both fast paths' ranges
    mixed[torch.arange(special.numel()), torch.arange(special.numel()) % 8] = special
    partial = torch.tensor([0.5, 3.0, 7.0])  # the last vector
    return torch.cat([ordinary, mixed.reshape(-1), special, partial])


def assert_same_floats(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The same bits, NaN where NaN (of any payload)."""
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int32), expected[~expected.isnan()].view(torch.int32))


def test_kernel_log2_and_exp2_are_elementarys_in_every_lane():
    """The kernel's log2 and exp2 (a fast path for vectors of 8 ordinary values, the general one
    for vectors holding a zero, subnormal, negative, infinite or NaN lane, or, for exp2, an
    exponent outside [-125, 126]) give slimtrain.quant.elementary's bits."""
    library = kernels.cpu_kernels()
    if library is None:
        pytest.skip("no C compiler")
    x = elementary_inputs()
    log2_out, exp2_out = torch.empty_like(x), torch.empty_like(x)
    library.elementary_lanes(x.numel(), x.data_ptr(), log2_out.data_ptr(), exp2_out.data_ptr())
    assert_same_floats(log2_out, elementary.log2(x))
    assert_same_floats(exp2_out, elementary.exp2(x))


def search_lanes(table: torch.Tensor, x: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """The kernel's count of entries of ``table`` below each of ``x`` (at or below if inclusive)."""
    library = kernels.cpu_kernels()
    if library is None:
        pytest.skip("no C compiler")
    padded = torch.cat([x, torch.zeros(-x.numel() % 8)])
    out = torch.empty(padded.numel(), dtype=torch.int32)
    status = library.search_lanes(table.data_ptr(), table.numel(), padded.numel(), padded.data_ptr(),
                                  int(inclusive), out.data_ptr())
    assert status == 0
    return out[: x.numel()]


def searched_tables():
    """Every codebook's tables as the kernel searches them: midpoints (nearest rounding) and the
    inner levels (stochastic rounding), signed and unsigned, dynamic and linear, 2 to 8 bits."""
    for kind in st.quant.codebooks.CODEBOOK_KINDS:
        for bits in st.quant.codebooks.CODEBOOK_BITS:
            for signed in (True, False):
                levels = st.quant.codebook(kind, bits, signed)
                yield f"{kind}{bits}{'s' if signed else 'u'}-mids", (levels[1:] + levels[:-1]) / 2
                yield f"{kind}{bits}{'s' if signed else 'u'}-levels", levels[1:-1]


def expected_counts(table: torch.Tensor, x: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """torch.searchsorted's count, 0 for NaN (the kernel's convention)."""
    counts = torch.searchsorted(table, x, right=inclusive).to(torch.int32)
    return counts.masked_fill(x.isnan(), 0)


@pytest.mark.parametrize("inclusive", [False, True])
def test_kernel_search_counts_entries_below_as_searchsorted(inclusive):
    """Both searches (registers for up to 15 entries, buckets above) count exactly: at every entry,
    the floats just beside it, +-0, +-1, beyond +-1, infinities and NaN, and random values."""
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 3e38, -3e38, float("inf"), float("-inf"),
                            float("nan"), 1e-45, -1e-45, 1e-39, -1e-39])
    for name, table in searched_tables():
        edges = torch.cat([table, special])
        beside = torch.cat([torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
        uniform = torch.rand(2000, generator=generator) * 2 - 1
        tiny = uniform * torch.exp2(-30 * torch.rand(2000, generator=generator))
        x = torch.cat([edges, beside, uniform, tiny])
        x = x[torch.randperm(x.numel(), generator=generator)]  # mixed lanes
        got = search_lanes(table, x, inclusive)
        assert torch.equal(got, expected_counts(table, x, inclusive)), name


@settings(max_examples=60, deadline=None)
@given(values=hypothesis_st.lists(hypothesis_st.floats(-1.0, 1.0, width=32), min_size=1, max_size=64),
       bits=hypothesis_st.sampled_from(st.quant.codebooks.CODEBOOK_BITS),
       kind=hypothesis_st.sampled_from(st.quant.codebooks.CODEBOOK_KINDS), signed=hypothesis_st.booleans(),
       inclusive=hypothesis_st.booleans())
def test_kernel_search_agrees_with_searchsorted_on_any_values(values, bits, kind, signed, inclusive):
    table = st.quant.codebook(kind, bits, signed)[1:-1]
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(search_lanes(table, x, inclusive), expected_counts(table, x, inclusive))


def test_kernel_search_refuses_tables_its_buckets_cannot_split():
    """Entries closer than the finest buckets, or outside [-1, 1]: status 1, nothing searched."""
    library = kernels.cpu_kernels()
    if library is None:
        pytest.skip("no C compiler")
    crowded = torch.linspace(0.5, 0.5 + 2**-20, 20)
    outside = torch.linspace(-1, 1.5, 20)
    x, out = torch.zeros(8), torch.zeros(8, dtype=torch.int32)
    for table in (crowded, outside):
        assert library.search_lanes(table.data_ptr(), table.numel(), 8, x.data_ptr(), 0, out.data_ptr()) == 1


def test_blocks_larger_than_the_kernel_takes_are_left_to_the_other_paths():
    """block_size above kernels.MOST_BLOCK_SIZE is a valid option: the C kernel declines it (and
    torch.compile or eager take the step) instead of failing after the states exist."""
    param = torch.nn.Parameter(torch.randn(1000))
    param.grad = torch.randn(1000)
    assert kernels.layout_of(param, kernels.MOST_BLOCK_SIZE, None) == "blocks"
    assert kernels.layout_of(param, 2 * kernels.MOST_BLOCK_SIZE, None) is None
