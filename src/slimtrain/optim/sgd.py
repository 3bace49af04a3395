"""SGD with (optionally low-bit) momentum."""

from __future__ import annotations

from typing import Any

from slimtrain.optim.base import LowBitOptimizer, check_choice, check_number
from slimtrain.optim.functional import sgd_update_
from slimtrain.optim.state import SIGNED_MAPS, STATE_BITS, StateFormat
from slimtrain.quant import ROUNDING_MODES


class SGD(LowBitOptimizer):
    """SGD with momentum whose buffer can be stored in a few bits.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: as in
            ``torch.optim.SGD`` (weight decay is coupled: added to the gradient).
        state_bits: bits of the momentum buffer: 32, 16, 8, 4, 3 or 2.
        state_maps: level map below 16 bits: "dynamic" or "linear".
        state_rounding: "nearest" or "stochastic".
        block_size, min_quantized_numel, seed: as in :class:`slimtrain.AdamW`.
    """

    state_names = ("momentum_buffer",)
    state_signed = (True,)

    def __init__(
        self, params: Any, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False, *, state_bits: int = 32,
        state_maps: str = "dynamic", state_rounding: str = "nearest", block_size: int = 128,
        min_quantized_numel: int = 4096, maximize: bool = False, seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, state_bits=state_bits,
            state_maps=state_maps, state_rounding=state_rounding, block_size=block_size,
            quantile=0.1, min_quantized_numel=min_quantized_numel, compile=False,
        )
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_number("dampening", group["dampening"], 0.0, 1.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        for key, accepted in (("state_bits", STATE_BITS), ("state_maps", SIGNED_MAPS),
                              ("state_rounding", ROUNDING_MODES)):
            value = group[key]
            value = value[0] if isinstance(value, (tuple, list)) and len(value) == 1 else value
            check_choice(key, value, accepted)
            group[key] = (value,)

    def has_states(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0

    @staticmethod
    def update_rule(param, grad, states, scalars, first) -> None:  # noqa: ANN001
        sgd_update_(param, grad, states.get("momentum_buffer"), first=first, **scalars)

    def _scalars(
        self, group: dict[str, Any], formats: dict[str, StateFormat], step: float
    ) -> dict[str, Any]:
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        return {key: group[key] for key in keys}
