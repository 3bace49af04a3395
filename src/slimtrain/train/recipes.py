"""Named training recipes: how weights are stored, how they are updated, and how many bits the
optimizer states take. A recipe turns a float32 model and its parameters into slimtrain's setup."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from slimtrain.optim import AdamW
from slimtrain.weights import quantize_weights_


@dataclass(frozen=True)
class Recipe:
    """A training setup.

    weight_format: storage of the nn.Linear weights (embeddings, the output head, norms and biases
    stay float32); None keeps float32. granularity / group_size: scales of that format.
    weight_update: "master", "naive" or "eco" for low-precision weights; rounding: "nearest" or
    "stochastic" when they are re-quantized. state_bits: bits of Adam's (m, v).
    """

    name: str
    description: str
    weight_format: str | None = None
    granularity: str = "row"
    group_size: int = 128
    weight_update: str = "master"
    rounding: str = "nearest"
    state_bits: tuple[int, int] = (32, 32)

    def prepare_model(self, model: nn.Module) -> list[str]:
        """Convert ``model``'s weights in place to this recipe's storage; returns converted names."""
        if self.weight_format is None:
            return []
        return quantize_weights_(model, self.weight_format, self.granularity, self.group_size)

    def optimizer_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`slimtrain.AdamW` that this recipe sets."""
        return dict(state_bits=self.state_bits, weight_update=self.weight_update, rounding=self.rounding)

    def make_optimizer(self, params: Any, **options: Any) -> AdamW:
        """``st.AdamW(params, **options)`` with this recipe's settings."""
        return AdamW(params, **options, **self.optimizer_options())

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _fp8(name: str, update: str, rounding: str, what: str) -> Recipe:
    return Recipe(name, what, "fp8_e4m3", weight_update=update, rounding=rounding)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("adamw", "FP32 weights and FP32 AdamW states (the reference)"),
        Recipe("bf16-master", "BF16 weights with an FP32 master copy (standard mixed precision)",
               "bf16"),
        _fp8("fp8-master-rtn", "master", "nearest", "FP8 weights, FP32 master copy, round to nearest"),
        _fp8("fp8-master-sr", "master", "stochastic", "FP8 weights, FP32 master copy, stochastic rounding"),
        _fp8("fp8-naive-rtn", "naive", "nearest", "FP8 weights, no master, rounding error dropped (RTN)"),
        _fp8("fp8-naive-sr", "naive", "stochastic", "FP8 weights, no master, rounding error dropped (SR)"),
        _fp8("eco-rtn", "eco", "nearest", "FP8 weights, no master, ECO error feedback, RTN"),
        _fp8("eco-sr", "eco", "stochastic", "FP8 weights, no master, ECO error feedback, SR"),
        Recipe("solo-4-2", "FP32 weights, SOLO 4-bit m / 2-bit logarithmic v", state_bits=(4, 2)),
        Recipe("solo-2-2", "FP32 weights, SOLO 2-bit m / 2-bit logarithmic v", state_bits=(2, 2)),
        Recipe("slim", "FP8 weights + ECO (SR) + SOLO 4/2-bit states: the default", "fp8_e4m3",
               weight_update="eco", rounding="stochastic", state_bits=(4, 2)),
        Recipe("int4-eco", "INT4 weights (group-32 scales) + ECO (SR) + SOLO 4/2-bit states", "int4",
               granularity="group", group_size=32, weight_update="eco", rounding="stochastic",
               state_bits=(4, 2)),
    ]
}
DEFAULT_RECIPE = "slim"


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ValueError naming the accepted recipes otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return RECIPES[name]
