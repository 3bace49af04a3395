"""Cases of tests/optim/test_triton.py, run as ``python -m tests.optim.triton_cases CASE`` in a
process started with TRITON_INTERPRET=1 (Triton's interpreter must be on before Triton is first
imported): the Triton kernels step CPU tensors there, each operation computed in float32 by numpy,
as a GPU computes it when the kernel is launched without fused multiply-adds."""

import sys

import torch
import triton
import triton.language as tl

import slimtrain as st
from slimtrain.optim import kernels
from slimtrain.optim.kernels import triton_adamw
from slimtrain.quant import elementary
from slimtrain.quant.formats import _FLOAT8, _float8_stochastic, format_max
from slimtrain.train.models import GPT, GPT_SIZES
from slimtrain.train.recipes import RECIPES
from tests.optim.test_kernels import assert_same_floats, elementary_inputs, float8_tie_cases, run, run_weight

CALLS: list[int] = []
kernels.TRITON_DEVICES = {"cpu"}
_original_step, _original_weight_step = triton_adamw.adamw_step, triton_adamw.adamw_weight_step
triton_adamw.adamw_step = lambda *a: CALLS.append(1) or _original_step(*a)
triton_adamw.adamw_weight_step = lambda *a: CALLS.append(1) or _original_weight_step(*a)

CONFIGURATIONS = [
    dict(state_bits=(4, 2)),
    dict(state_bits=(2, 2), state_rounding="nearest"),
    dict(state_bits=(4, 4), maximize=True, block_size=32, weight_decay=0.3),
    dict(state_bits=(2, 4), quantile=0.3, block_size=16, eps=1e-3, betas=(0.5, 0.9)),
    dict(state_bits=(3, 3), state_rounding="nearest"),  # codes straddle bytes
    dict(state_bits=(8, 8), state_maps=("linear", "log")),
    dict(state_bits=(8, 2), state_rounding="stochastic"),  # m rounded stochastically, 256 levels
    dict(state_bits=(2, 3), state_rounding=("stochastic", "nearest"), block_size=8),
]
WEIGHT_CONFIGURATIONS = [  # (shape, options): float8 weights updated without a master copy
    ((48, 128), dict(state_bits=(4, 2), rounding="stochastic")),  # the slim recipe
    ((7, 384), dict(state_bits=(4, 2), rounding="stochastic")),  # rows of 3 blocks (4 with padding)
    ((48, 128), dict(state_bits=(4, 2), rounding="nearest", maximize=True)),
    ((30, 64), dict(state_bits=(2, 2), weight_update="naive", rounding="stochastic", block_size=32)),
    ((24, 256), dict(state_bits=(4, 4), fmt="fp8_e5m2", weight_decay=0.5)),
    ((10, 96), dict(state_bits=(4, 2), granularity="group", group_size=32, block_size=32)),
    ((3, 1536), dict(state_bits=(4, 2), granularity="group", group_size=64)),
    ((2, 2048), dict(state_bits=(4, 2), rounding="stochastic")),  # a row of 16 blocks
    ((11, 192), dict(state_bits=(4, 2), rounding="stochastic")),  # rows straddle blocks (small GPT)
    ((9, 40), dict(state_bits=(2, 4), rounding="nearest", weight_update="naive")),  # 16 rows a unit
    ((48, 128), dict(state_bits=(32, 32), rounding="stochastic")),  # eco-sr: float32 states
    ((11, 192), dict(state_bits=(32, 32), rounding="nearest", weight_update="naive", maximize=True)),
    ((48, 128), dict(fmt="int8", state_bits=(4, 2), rounding="stochastic")),
    ((11, 192), dict(fmt="int4", granularity="group", group_size=32, state_bits=(4, 2),
                     rounding="stochastic")),  # the int4-eco recipe
    ((7, 200), dict(fmt="int4", state_bits=(2, 2), rounding="nearest", block_size=16)),  # row scales
    ((48, 128), dict(state_bits=(8, 3), weight_update="naive", rounding="stochastic", maximize=True)),
    ((11, 192), dict(state_bits=(2, 2), state_rounding="stochastic", rounding="stochastic")),
]
UNCOVERED = [dict(state_bits=(4, 2), block_size=48), dict(state_bits=(32, 2)), dict(state_bits=(4, 32)),
             dict(state_bits=(4, 2), state_maps=("dynamic", "dynamic"))]


def assert_same(fused: tuple, eager: tuple, what: str) -> None:
    assert torch.equal(fused[0], eager[0]), f"{what}: parameters differ"
    for key in fused[1]:
        assert torch.equal(fused[1][key], eager[1][key]), f"{what}: {key} differs"


def assert_same_weight(fused: tuple, eager: tuple, what: str) -> None:
    """The same codes, scales and states of two run_weight results."""
    codes = fused[0].codes.view(torch.uint8), eager[0].codes.view(torch.uint8)
    assert torch.equal(*codes), f"{what}: codes differ"
    assert torch.equal(fused[0].scales, eager[0].scales), f"{what}: scales differ"
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


def random_gradients() -> None:
    """Random lengths; block sizes, state bits and roundings in turn; gradients mixing zeros,
    subnormals, ordinary values and values whose squares overflow float32."""
    generator = torch.Generator().manual_seed(7)
    kinds = torch.tensor([0.0, 1e-40, 1.0, 2.0**70])
    for case in range(16):
        numel = int(torch.randint(1, 700, (), generator=generator))
        block = (8, 16, 32, 128)[case % 4]
        bits = ((4, 2), (2, 2), (3, 4), (8, 3), (4, 8), (2, 4), (3, 2), (8, 8))[case // 2]
        rounding = (("nearest", "stochastic")[case % 2], ("stochastic", "nearest")[case % 3 == 0])
        grads = [kinds[torch.randint(0, 4, (numel,), generator=generator)]
                 * torch.randn(numel, generator=generator) for _ in range(2)]
        results = []
        CALLS.clear()
        for fused in (True, False):
            param = torch.nn.Parameter(torch.linspace(-1, 1, numel))
            opt = st.AdamW([param], lr=1e-2, compile=fused, min_quantized_numel=0, state_bits=bits,
                           block_size=block, seed=case, state_rounding=rounding)
            for grad in grads:
                param.grad = grad.clone()
                opt.step()
            results.append((param.detach().clone(), opt.state[param]))
        what = f"case {case}: {numel} elements, blocks of {block}, bits {bits}, rounding {rounding}"
        assert len(CALLS) == 2, what
        assert_same(*results, what)


def weights() -> None:
    """Float8, int8 and int4 weights (row and group scales, ECO and naive, nearest and stochastic
    rounding, quantized and float32 states)."""
    for shape, options in WEIGHT_CONFIGURATIONS:
        CALLS.clear()
        fused = run_weight(True, shape, steps=3, **options)
        assert len(CALLS) == 3, f"{options}: {len(CALLS)} Triton steps of 3"
        assert_same_weight(fused, run_weight(False, shape, steps=3, **options), f"{shape} {options}")


@triton.jit
def _elementwise(x_ptr, noise_ptr, out_ptr, n, WHAT: tl.constexpr, MANTISSA: tl.constexpr,
                 BIAS: tl.constexpr, FORMAT_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """out = log2(x) (WHAT 0), exp2(x) (1) or the float8 stochastic code of x (2), as float32."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=1.0)
    if WHAT == 0:
        out = triton_adamw._log2(x)
    elif WHAT == 1:
        out = triton_adamw._exp2(x)
    else:
        noise = tl.load(noise_ptr + i, mask=mask, other=0.0)
        out = triton_adamw._float8_stochastic(x, noise, MANTISSA, BIAS, FORMAT_MAX).to(tl.float32)
    tl.store(out_ptr + i, out, mask=mask)


def elementwise(what: int, x: torch.Tensor, noise: torch.Tensor | None = None, fmt: str = "fp8_e4m3"):
    out = torch.empty_like(x)
    mantissa, bias = kernels.FLOAT8_LAYOUTS[fmt]
    _elementwise[(triton.cdiv(x.numel(), 1024),)](x, x if noise is None else noise, out, x.numel(), what,
                                                  mantissa, bias, format_max(fmt), 1024)
    return out


def elementary_functions() -> None:
    """The kernel's log2 and exp2 give slimtrain.quant.elementary's bits on special values too, and
    its float8 stochastic rounding the eager one's at exact ties."""
    x = elementary_inputs()
    assert_same_floats(elementwise(0, x), elementary.log2(x))
    assert_same_floats(elementwise(1, x), elementary.exp2(x))
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        y, noise = float8_tie_cases(fmt)
        expected = _float8_stochastic(y, _FLOAT8[fmt], noise).view(torch.uint8)
        assert torch.equal(elementwise(2, y, noise, fmt).to(torch.uint8), expected), fmt


def training() -> None:
    """Two steps of the tiny GPT under the `slim` recipe (the tied embedding, norms, FP8 linears)
    and the `solo-2-2` recipe (float32 weights, m rounded stochastically):
    the Triton kernels' losses, weights and states are the C kernel's bits."""
    for recipe in (RECIPES["slim"], RECIPES["solo-2-2"]):
        runs = []
        for devices in ({"cpu"}, set()):  # Triton (interpreted), then the C kernel
            kernels.TRITON_DEVICES = devices
            CALLS.clear()
            torch.manual_seed(0)
            model = GPT(GPT_SIZES["tiny"])
            recipe.prepare_model(model)
            opt = recipe.make_optimizer(model, lr=3e-3, seed=1)
            tokens = torch.randint(0, 256, (2, 2, 33), generator=torch.Generator().manual_seed(2))
            losses = []
            for batch in tokens:
                logits = model(batch[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            runs.append((losses, model.state_dict(), opt.state_dict()["state"], len(CALLS)))
        (triton_losses, triton_model, triton_state, calls), (c_losses, c_model, c_state, _) = runs
        assert calls > 0, recipe.name
        assert triton_losses == c_losses, recipe.name
        for key, value in triton_model.items():
            assert torch.equal(value, c_model[key]), f"{recipe.name}: {key}"
        for index, state in triton_state.items():
            for key, value in state.items():
                assert torch.equal(value, c_state[index][key]), f"{recipe.name}: state {index} {key}"
    kernels.TRITON_DEVICES = {"cpu"}


def uncovered() -> None:
    """Formats the kernel does not cover take the C kernel (the same bits), never the Triton one."""
    for options in UNCOVERED:
        fused = run(True, (4097,), steps=2, **options)
        assert not CALLS, f"{options}: stepped by the Triton kernel"
        assert_same(fused, run(False, (4097,), steps=2, **options), str(options))
    for fmt, shape, options in [("int4", (48, 33 * 2), dict(granularity="group", group_size=33 * 2)),
                                ("fp8_e4m3", (48, 33), {}),
                                ("fp8_e4m3", (48, 128), dict(state_bits=(8, 32)))]:
        fused = run_weight(True, shape, fmt, steps=2, **options)
        assert not CALLS, f"{fmt} {shape} {options}: stepped by the Triton kernel"
        eager = run_weight(False, shape, fmt, steps=2, **options)
        assert_same_weight(fused, eager, f"{fmt} {shape} {options}")


if __name__ == "__main__":
    cases = {"configurations": configurations, "special_values": special_values,
             "random_gradients": random_gradients, "weights": weights,
             "elementary_functions": elementary_functions, "training": training, "uncovered": uncovered}
    cases[sys.argv[1]]()
