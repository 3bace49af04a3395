"""SGD with (optionally low-bit) momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from slimtrain.optim import kernels
from slimtrain.optim.base import LowBitOptimizer, check_choice, check_number, plain_float32
from slimtrain.optim.functional import sgd_update_
from slimtrain.optim.state import SIGNED_MAPS, STATE_BITS, StateFormat
from slimtrain.quant import ROUNDING_MODES
from slimtrain.weights.tensor import is_low_precision


def sgd_rule(
    param: torch.Tensor, grad: torch.Tensor, states: dict, scalars: dict, first: bool
) -> None:
    """The update rule on float32 chunks (see :func:`slimtrain.optim.base.step_chunk_`)."""
    sgd_update_(param, grad, states.get("momentum_buffer"), first=first, lr=scalars["lr"],
                momentum=scalars["momentum"], dampening=scalars["dampening"],
                weight_decay=scalars["weight_decay"], nesterov=scalars["nesterov"],
                reproducible=scalars["reproducible"])


def torch_fused_step(param: torch.Tensor, state: dict, scalars: dict, maximize: bool) -> bool:
    """The step of a plain float32 ``param`` with a float32 momentum buffer (or none) through
    torch's fused SGD kernel (CPU or GPU; ``state["step"]`` already advanced): the bits of
    ``torch.optim.SGD(fused=True)``; False where this torch has none."""
    fused = getattr(torch, "_fused_sgd_", None)
    if fused is None or not plain_float32(param):
        return False
    buffer = state.get("momentum_buffer")
    fused([param], [param.grad], [] if buffer is None else [buffer], weight_decay=scalars["weight_decay"],
          momentum=scalars["momentum"], lr=scalars["lr"], dampening=scalars["dampening"],
          nesterov=scalars["nesterov"], maximize=maximize,
          is_first_step=buffer is not None and state["step"].item() == 1, grad_scale=None, found_inf=None)
    return True


def sgd_eco_injection(states: dict, error: torch.Tensor, scalars: dict) -> None:
    """ECO for SGD with momentum: buf += (1 / lr) (1 - 1 / momentum) e (the product rounded apart
    from the sum, as the C kernel computes it)."""
    states["momentum_buffer"].add_(error * scalars["eco_scale"])


class SGD(LowBitOptimizer):
    """SGD with momentum whose buffer can be stored in a few bits.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: as in
            ``torch.optim.SGD`` (weight decay is coupled: added to the gradient).
        state_bits: bits of the momentum buffer: 32, 16, 8, 4, 3 or 2.
        state_maps: level map below 16 bits: "dynamic" or "linear".
        state_rounding: "nearest" or "stochastic".
        weight_update, rounding: for parameters stored below float32, as in
            :class:`slimtrain.AdamW`; "eco" needs momentum > 0 and no Nesterov. Default: "eco"
            with momentum, "naive" without.
        block_size, min_quantized_numel, seed: as in :class:`slimtrain.AdamW`.
        compile: a float32 parameter with a float32 buffer (or none) steps through torch's fused
            SGD kernel (the bits of ``torch.optim.SGD(fused=True)``); on the CPU, one with a
            quantized buffer, and an FP8/INT8/INT4 weight with row or group scales and a buffer
            ("eco" or "naive" updates), in slimtrain's C kernel (the bits of the eager step);
            every other step, and every step with False, runs as eager torch code (float32
            buffers: the bits of ``torch.optim.SGD()``).
    """

    state_names = ("momentum_buffer",)
    state_signed = (True,)

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False, *, state_bits: int = 32,
        state_maps: str = "dynamic", state_rounding: str = "nearest", block_size: int = 128,
        min_quantized_numel: int = 4096, weight_update: str | None = None, rounding: str = "nearest",
        maximize: bool = False, seed: int | None = None, compile: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, state_bits=state_bits,
            state_maps=state_maps, state_rounding=state_rounding, block_size=block_size,
            quantile=0.1, min_quantized_numel=min_quantized_numel, compile=compile,
            weight_update=weight_update, rounding=rounding,
            eco_decay_correction=False,
        )
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        if group["weight_update"] is None:  # each group's default follows its own momentum
            group["weight_update"] = "eco" if group["momentum"] > 0 else "naive"
        super()._check_group(group)
        check_number("dampening", group["dampening"], 0.0, 1.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        if group["weight_update"] == "eco" and any(p_low for p_low in map(is_low_precision, group["params"])):
            if group["nesterov"]:
                raise ValueError("weight_update='eco' does not support nesterov=True (no derived rule); "
                                 "use nesterov=False or weight_update='master'")
            if group["momentum"] <= 0:
                raise ValueError("weight_update='eco' needs momentum > 0: the error is fed back into "
                                 "the momentum buffer")
        for key, accepted in (("state_bits", STATE_BITS), ("state_maps", SIGNED_MAPS),
                              ("state_rounding", ROUNDING_MODES)):
            value = group[key]
            value = value[0] if isinstance(value, (tuple, list)) and len(value) == 1 else value
            check_choice(key, value, accepted)
            group[key] = (value,)

    def has_states(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0

    rules = (sgd_rule, sgd_eco_injection)
    compiles = False  # no torch.compile path: its rule takes float scalars (see compile above)

    def _scalars(
        self, group: dict[str, Any], formats: dict[str, StateFormat], step: float, low_precision: bool
    ) -> dict[str, Any]:
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        eco = group["weight_update"] == "eco" and group["lr"] > 0 and group["momentum"] > 0
        eco_scale = (1 - 1 / group["momentum"]) / group["lr"] if eco else 0.0
        # quantized buffers or weights: the rounding of the C kernel; float32 ones: torch.optim.SGD's
        reproducible = low_precision or any(f.quantized for f in formats.values())
        return {key: group[key] for key in keys} | {"eco_scale": eco_scale, "reproducible": reproducible}

    def _fused_step(
        self, group: dict[str, Any], param: torch.Tensor, formats: dict[str, StateFormat], state: dict,
        scalars: dict[str, Any], seeds: dict[str, int | None], options: tuple[bool, str | None],
        weight_seed: int | None,
    ) -> bool:
        """The step of a float32 parameter with a float32 momentum buffer (or none) through
        torch's fused SGD kernel (the bits of ``torch.optim.SGD(fused=True)``); on the CPU, of a
        contiguous float32 parameter with a quantized buffer, or of an FP8/INT8/INT4 weight with
        row or group scales and a buffer ("eco" or "naive" updates), in the C kernel (the bits of
        the eager step). False for any other (see the base class)."""
        maximize, weight_update = options
        fmt = formats.get("momentum_buffer")
        if weight_update is None and (fmt is None or fmt.bits == 32):
            return torch_fused_step(param, state, scalars, maximize)
        if fmt is None or not kernels.supported(fmt):
            return False
        def constants() -> kernels.SGDScalars:  # made only when the C kernel takes the step
            return kernels.SGDScalars(
                neg_lr=-scalars["lr"], momentum=scalars["momentum"],
                one_minus_dampening=1 - scalars["dampening"], weight_decay=scalars["weight_decay"],
                nesterov=int(scalars["nesterov"]), maximize=int(maximize),
                first=int(state["step"].item() == 1),
            )

        return kernels.c_kernel_step(param, ("sgd_step_blocks", "sgd_step_weight_rows"), state,
                                     {"momentum_buffer": fmt}, seeds, weight_update, weight_seed,
                                     scalars["eco_scale"], constants)
