"""Shared machinery of slimtrain's optimizers: argument checks, low-bit state formats, the
stochastic-rounding generator, and state_dict round trips that never cast quantized state."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from slimtrain.optim.state import (
    StateFormat,
    chunk_numel,
    chunk_views,
    init_state,
    layout,
    read_state,
    write_state,
)
from slimtrain.quant import ROUNDING_MODES, draw_seed
from slimtrain.weights.tensor import QuantizedWeight, is_low_precision, read_weight, store_weight_

WEIGHT_UPDATES = ("master", "naive", "eco")

# Group options that decide how state is stored: a state_dict must agree on them to load.
LAYOUT_OPTIONS = ("state_bits", "block_size", "quantile", "min_quantized_numel", "state_maps")


def check_choice(name: str, value: Any, accepted: Iterable[Any]) -> None:
    """Raise ValueError naming ``name`` and the accepted values unless ``value`` is one of them."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")


def resolve_seed(seed: int | None) -> int:
    """The stochastic-rounding seed of an optimizer: ``seed``, or ``torch.initial_seed()`` for None
    (following torch.manual_seed without consuming the global stream)."""
    if seed is None:
        return torch.initial_seed()
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return seed


def check_block_size(size: Any) -> None:
    """Raise ValueError unless ``size`` (elements per quantization scale) is a positive multiple
    of 8."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 8 or size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {size!r}")


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf,
                 high_open: bool = False, low_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is a real number in [low, high] (open ends on request)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        brackets = ("(" if low_open else "[", ")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {brackets[0]}{low}, {high}{brackets[1]}, got {value!r}")


def check_adam_options(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """ValueError naming the first of lr, betas, eps, weight_decay that is out of range."""
    check_number("lr", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
    check_number("eps", eps)
    check_number("weight_decay", weight_decay)


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimizer's ``closure`` (None without one), computed with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def as_pair(name: str, value: Any, accepted: tuple) -> tuple:
    """``value`` or ``(value, value)`` as a pair, each checked against ``accepted``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be one value or a pair, got {value!r}")
    for item in pair:
        check_choice(name, item, accepted)
    return pair


class LowBitOptimizer(torch.optim.Optimizer):
    """Base class: subclasses name their states and implement ``_update``.

    Subclasses set ``state_names`` (e.g. ("exp_avg", "exp_avg_sq")) and ``state_signed``, and
    store per group the options in LAYOUT_OPTIONS, with ``state_bits``, ``state_maps`` and
    ``state_rounding`` as tuples aligned with ``state_names``.
    """

    state_names: tuple[str, ...] = ()
    state_signed: tuple[bool, ...] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any], seed: int | None) -> None:
        seed = resolve_seed(seed)
        super().__init__(params, defaults)
        self._generator = torch.Generator(device="cpu").manual_seed(seed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch does) after checking and normalizing its options; the caller's
        dict is left as it was."""
        params = param_group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        group = {**self.defaults, **param_group, "params": params}
        self._check_group(group)
        super().add_param_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for a bad option of ``group``; normalize tuple-valued options in place."""
        check_number("lr", group["lr"])
        check_number("weight_decay", group["weight_decay"])
        check_block_size(group["block_size"])
        check_choice("compile", group["compile"], (True, False))
        check_choice("weight_update", group["weight_update"], WEIGHT_UPDATES)
        check_choice("rounding", group["rounding"], ROUNDING_MODES)
        check_choice("eco_decay_correction", group["eco_decay_correction"], (True, False))
        params = group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        if group["rounding"] == "stochastic" and any(p.dtype == torch.float16 for p in params):
            raise ValueError("rounding='stochastic' is not supported for float16 parameters: "
                             "use rounding='nearest' or bfloat16")
        check_number("quantile", group["quantile"], 0.0, 1.0, high_open=True)
        check_number("min_quantized_numel", group["min_quantized_numel"], 0)

    # ----------------------------------------------------------------------------- formats
    def has_states(self, group: dict[str, Any]) -> bool:
        """Whether parameters of ``group`` keep the states in ``state_names`` (SGD without
        momentum keeps none)."""
        return True

    def state_formats(self, group: dict[str, Any], param: torch.Tensor) -> dict[str, StateFormat]:
        """The storage format of each state that ``param`` in ``group`` keeps, by state name."""
        master = (
            {"master": StateFormat(bits=32, signed=True)}
            if is_low_precision(param) and group["weight_update"] == "master" else {}
        )
        if not self.has_states(group):
            return master
        small = param.numel() < group["min_quantized_numel"]
        return master | {
            name: StateFormat(
                bits=32 if small else bits, signed=signed, kind=kind,
                block_size=group["block_size"], quantile=group["quantile"],
                stochastic=rounding == "stochastic",
            )
            for name, bits, signed, kind, rounding in zip(
                self.state_names, group["state_bits"], self.state_signed, group["state_maps"],
                group["state_rounding"], strict=True,
            )
        }

    def _init_states(self, state: dict, formats: dict[str, StateFormat], param: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0)
        for name, fmt in formats.items():
            init_state(state, name, fmt, param)
        if "master" in formats:
            state["master"].copy_(read_weight(param).view_as(state["master"]))

    def _seed(self, stochastic: bool) -> int | None:
        """A fresh stochastic-rounding seed when needed (drawn in a fixed order)."""
        return draw_seed(self._generator) if stochastic else None

    # ------------------------------------------------------------------------------- step
    @staticmethod
    def _check_grads(groups: list[dict[str, Any]]) -> None:
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("sparse gradients are not supported: use dense gradients")
                if not p.is_floating_point() or p.is_complex():
                    raise TypeError(f"parameters must be real floating point, got dtype {p.dtype}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient; returns closure's loss."""
        loss = run_closure(closure)
        self._check_grads(self.param_groups)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p, self.state[p])
        return loss

    def _update(self, group: dict[str, Any], param: torch.Tensor, state: dict) -> None:
        """Advance ``param`` and its states, chunk by chunk (decode, update rule, encode).

        Quantized weights are processed whole (their scales span rows); parameters stored below
        float32 get ``group["weight_update"]``: "master", "naive" or "eco".
        """
        formats = self.state_formats(group, param)
        first = not state
        if first:
            self._init_states(state, formats, param)
        state["step"] += 1
        low_precision = is_low_precision(param)
        scalars = self._scalars(group, formats, state["step"].item(), low_precision)
        seeds = {name: self._seed(fmt.quantized and fmt.stochastic) for name, fmt in formats.items()}
        weight_seed = self._seed(low_precision and group["rounding"] == "stochastic")
        options = (group["maximize"], group["weight_update"] if low_precision else None)
        quantized_states = any(f.quantized for f in formats.values())
        fused = group["compile"] and self.compiles and (quantized_states or low_precision)
        if group["compile"] and self._fused_step(group, param, formats, state, scalars, seeds, options,
                                                 weight_seed):
            return
        # no kernel covers it: torch.compile (for low-precision weights not on a CPU, see
        # EAGER_WEIGHT_DEVICES), else eager; the first step (states start at zero) always runs
        # eagerly rather than compiling a graph used once
        compiled = fused and not first and not (low_precision and param.device.type in EAGER_WEIGHT_DEVICES)
        if compiled:  # tensors, so that a compiled step does not specialize on their values
            scalars = {k: v if isinstance(v, bool) else torch.tensor(v, dtype=torch.float32,
                                                                     device=param.device)
                       for k, v in scalars.items()}
            def as_tensor(seed: int | None) -> torch.Tensor | None:
                return None if seed is None else torch.tensor(seed, device=param.device)
            seeds = {name: as_tensor(seed) for name, seed in seeds.items()}
            weight_seed = as_tensor(weight_seed)
        grad = param.grad.reshape(-1)
        if isinstance(param, QuantizedWeight):  # compiled steps see its plain tensors
            chunks, target = [(param.parts() if compiled else param, 0, param.numel())], param
        else:
            target = param if param.is_contiguous() else param.contiguous()
            flat, size = target.view(-1), chunk_numel(group["block_size"], param.device)
            chunks = [(flat[i:i + size], i, min(i + size, flat.numel()))
                      for i in range(0, flat.numel(), size)]
        for index, (part, start, stop) in enumerate(chunks):
            views: dict[str, torch.Tensor] = {}
            for name, fmt in formats.items():
                views.update(chunk_views(state, name, fmt, start, stop))
            noise_start = torch.tensor(start, device=param.device) if compiled else start
            step_chunk = compiled_step_chunk if compiled else step_chunk_
            step_chunk(self.rules, formats, options, first, part, grad[start:stop], views, scalars,
                       seeds, noise_start, None if weight_seed is None else weight_seed + index)
        if target is not param:
            param.copy_(target)

    # (update(param, grad, states, scalars, first), inject(states, error, scalars)), set by subclasses
    rules: tuple[Any, Any] = (None, None)
    # whether steps no kernel covers go through torch.compile under compile=True (else eager)
    compiles = True

    def _fused_step(
        self, group: dict[str, Any], param: torch.Tensor, formats: dict[str, StateFormat], state: dict,
        scalars: dict[str, Any], seeds: dict[str, int | None], options: tuple[bool, str | None],
        weight_seed: int | None,
    ) -> bool:
        """Run this step of ``param`` (in ``group``) in a fused kernel, if one covers it; return
        whether it did (subclasses with a kernel override this). Other arguments as for
        :func:`step_chunk_`."""
        return False

    def _scalars(
        self, group: dict[str, Any], formats: dict[str, StateFormat], step: float, low_precision: bool
    ) -> dict[str, Any]:
        """The scalar arguments of the rules for this step (floats or bools) of a parameter kept
        in ``formats`` (``low_precision``: stored below float32)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- state_dict
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "rng_state": self._generator.get_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng_state = state.pop("rng_state", None)  # absent when torch's load_state_dict calls
        super().__setstate__(state)
        if rng_state is not None:
            self._generator = torch.Generator(device="cpu")
            self._generator.set_state(rng_state)

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus ``rng_state`` (the stochastic-rounding generator, uint8)."""
        sd = super().state_dict()
        sd["rng_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of an optimizer with the same storage options.

        Unlike ``torch.optim.Optimizer.load_state_dict``, state tensors keep their dtype (codes
        and scales are never cast to the parameter dtype); they only move to the parameter's device.
        Raises ValueError, changing nothing, when groups, options or state layouts differ.
        """
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError("state_dict has a different number of parameter groups")
        if "rng_state" not in state_dict:
            raise ValueError("state_dict lacks 'rng_state': it was not saved by a slimtrain optimizer")
        index_to_param = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            for key in LAYOUT_OPTIONS:
                if tuple_or_value(saved.get(key)) != tuple_or_value(group[key]):
                    raise ValueError(
                        f"state_dict was saved with {key}={saved.get(key)!r} in param group {i}; "
                        f"this optimizer has {key}={group[key]!r}"
                    )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(group['params'])} parameters, "
                                 f"the state_dict {len(saved['params'])}")
            index_to_param.update(zip(saved["params"], group["params"], strict=True))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for index, values in state_dict["state"].items():
            if index not in index_to_param:
                raise ValueError(f"state_dict has a state for parameter {index!r}, "
                                 "which no param group lists")
            param = index_to_param[index]
            self._check_saved_state(index, values, group_of[id(param)], param)
        generator = checked_generator(state_dict["rng_state"])
        load_state_uncast(self, state_dict)
        self._generator = generator

    def _check_saved_state(self, index: int, values: dict, group: dict, param: torch.Tensor) -> None:
        expected = {"step": ((), torch.float32)}
        for name, fmt in self.state_formats(group, param).items():
            expected.update(layout(fmt, name, param.shape))
        found = {k: (tuple(v.shape), v.dtype) for k, v in values.items() if torch.is_tensor(v)}
        if found != expected:
            raise ValueError(
                f"state of parameter {index} does not match this optimizer's configuration: "
                f"expected {expected}, found {found}"
            )


def checked_generator(rng_state: Any) -> torch.Generator:
    """A CPU generator in the saved state ``rng_state`` (ValueError if it is not one)."""
    generator = torch.Generator(device="cpu")
    try:
        generator.set_state(rng_state)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"state_dict's rng_state is not the state of a CPU generator: {error}") from None
    return generator


def load_state_uncast(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """``torch.optim.Optimizer.load_state_dict`` without its cast of floating state tensors to the
    parameter's dtype: states keep their dtype and only move to the parameter's device."""
    index_to_param = {
        index: param
        for saved, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True)
        for index, param in zip(saved["params"], group["params"], strict=True)
    }
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    for index, values in state_dict["state"].items():
        param = index_to_param[index]
        optimizer.state[param] = {
            key: value.to(param.device) if torch.is_tensor(value) else value for key, value in values.items()
        }


def step_chunk_(
    rules: tuple[Any, Any], formats: dict[str, StateFormat], options: tuple[bool, str | None],
    first: bool, param: torch.Tensor, grad: torch.Tensor, views: dict[str, torch.Tensor],
    scalars: dict[str, Any], seeds: dict[str, Any], noise_start: int | torch.Tensor,
    weight_seed: int | None,
) -> None:
    """One chunk of a step: decode the states to float32, apply the update rule, store the
    weight, encode the states. ``param`` is a flat chunk (or a whole QuantizedWeight), ``grad``
    the matching flat gradient (a QuantizedWeight is passed whole, as its WeightParts when
    compiled), ``views`` the chunk's state tensors, ``noise_start`` the chunk's
    first element in its tensor; ``options`` is (maximize, weight update of a low-precision
    parameter or None).

    Weight updates: "master" updates the float32 copy in ``views["master"]`` and stores it
    rounded; "naive" updates the decoded weight and stores it rounded, dropping the error;
    "eco" does the same and feeds the error e = updated - stored into the momentum (ECO).
    """
    update, inject = rules
    maximize, weight_update = options
    grad = grad.float()
    if maximize:
        grad = -grad
    values = {name: read_state(views, name, fmt, grad) for name, fmt in formats.items()}
    work = values["master"] if weight_update == "master" else read_weight(param)
    update(work, grad, values, scalars, first)
    if weight_update is not None:
        stored = store_weight_(param, work, weight_seed)
        if weight_update == "eco":
            inject(values, work - stored, scalars)
    elif work is not param:
        param.copy_(work)
    for name, fmt in formats.items():
        write_state(views, name, fmt, values[name], seeds[name], noise_start)


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW and SGD step float32 states


def plain_float32(param: torch.Tensor) -> bool:
    """Whether ``param`` and its gradient are plain contiguous float32 tensors on a device of
    torch's fused optimizers (what their kernels take)."""
    grad = param.grad
    return (param.device.type in FUSED_DEVICES and type(param) in (torch.Tensor, torch.nn.Parameter)
            and param.dtype == grad.dtype == torch.float32 and param.is_contiguous()
            and grad.is_contiguous())


_compiled_step_chunk = None
COMPILE_LIMIT = 64
# devices whose low-precision weights (those no kernel covers) step eagerly: on a CPU, compiling
# their step costs more than a run of a few hundred steps saves (benchmarks/README.md)
EAGER_WEIGHT_DEVICES = {"cpu"}


def compiled_step_chunk(*args: Any) -> None:
    """:func:`step_chunk_` through ``torch.compile`` (C++ on CPU, Triton on GPU): one fused pass
    per chunk. Falls back to eager, with one warning, where compilation is unavailable."""
    global _compiled_step_chunk
    if _compiled_step_chunk is None:
        _compiled_step_chunk = torch.compile(step_chunk_)
    if _compiled_step_chunk is step_chunk_:
        return step_chunk_(*args)
    try:
        # one compiled graph per state format and shape family: allow more than dynamo's default;
        # numbers (bits, block sizes, quantiles) stay constants, so each format compiles its own kernels
        with torch._dynamo.config.patch(recompile_limit=COMPILE_LIMIT, specialize_int=True,
                                         specialize_float=True), warnings.catch_warnings():
            # dynamo traces through the cache of the (pure) codebook builders, and says so
            warnings.filterwarnings("ignore", ".*lru_cache`-wrapped function", UserWarning)
            return _compiled_step_chunk(*args)
    except Exception as error:  # no C++ compiler, unsupported device, ...
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); slimtrain steps "
                      "run eagerly from now on", RuntimeWarning, stacklevel=3)
        _compiled_step_chunk = step_chunk_
        return step_chunk_(*args)


def tuple_or_value(value: Any) -> Any:
    """Lists (as saved by some serializers) and tuples compare equal."""
    return tuple(value) if isinstance(value, list) else value
