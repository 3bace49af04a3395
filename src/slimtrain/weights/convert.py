"""Model conversion: ``quantize_weights_`` turns nn.Linear weights into quantized storage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimtrain.quant.formats import GRANULARITIES, GROUP_SIZES, WEIGHT_FORMATS
from slimtrain.weights.linear import QuantizedLinear
from slimtrain.weights.tensor import QuantizedWeight, WeightFormat

DEFAULT_EXCLUDE = ("embed", "head")  # substrings: "lm_head" too
_GRANULARITIES_OF = {"fp8_e4m3": ("tensor", "row"), "fp8_e5m2": ("tensor", "row"),
                     "int8": ("tensor", "row"), "int4": GRANULARITIES}  # bf16 has no scales


def _check(fmt: str, granularity: str, group_size: int) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"fmt must be one of {WEIGHT_FORMATS}, got {fmt!r}")
    accepted = _GRANULARITIES_OF.get(fmt)
    if accepted is not None and granularity not in accepted:  # bf16 (no scales) ignores it
        raise ValueError(f"granularity for {fmt} must be one of {accepted}, got {granularity!r}")
    if granularity == "group" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")


@torch.no_grad()
def quantize_weights_(
    model: nn.Module, fmt: str = "fp8_e4m3", granularity: str = "row", group_size: int = 128,
    include: Sequence[str] | None = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Convert, in place, the weights of ``model``'s nn.Linear layers to quantized storage.

    A layer is converted when its module name contains one of ``include`` (every layer when
    None) and none of ``exclude`` (default: embeddings and output heads). Norms, embeddings and
    biases are never converted. Returns the converted module names. Raises ValueError (before
    converting anything) for an unknown format, granularity or group size, an ``include`` pattern
    that matches no nn.Linear, an ``exclude`` pattern (other than the default's) that matches no
    module, or a layer whose width is not a multiple of ``group_size``.
    """
    _check(fmt, granularity, group_size)
    format = WeightFormat(fmt, "tensor" if fmt == "bf16" else granularity, group_size)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in include or []:
        if not any(pattern in name for name in linears):
            raise ValueError(f"include pattern {pattern!r} matches no nn.Linear module; their names are "
                             f"{sorted(linears)}")
    if tuple(exclude) != DEFAULT_EXCLUDE:  # the default may match nothing; a user's typo may not
        names = [name for name, _ in model.named_modules() if name]
        for pattern in exclude:
            if not any(pattern in name for name in names):
                raise ValueError(f"exclude pattern {pattern!r} matches no module; their names are "
                                 f"{names}")
    chosen = [
        name for name, module in linears.items()
        if (include is None or any(p in name for p in include))
        and not any(p in name for p in exclude)
        and not isinstance(module.weight, QuantizedWeight)
    ]
    for name in chosen:
        cols = linears[name].in_features
        if format.granularity == "group" and cols % group_size:
            raise ValueError(f"{name}: in_features {cols} is not a multiple of group_size {group_size}")
    for name in chosen:
        module = linears[name]
        weight = QuantizedWeight.from_float(module.weight, format)
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        module.__class__ = QuantizedLinear
    return chosen


def excluded_by_default(module_name: str) -> bool:
    """Whether a module name contains one of DEFAULT_EXCLUDE (embeddings, output heads)."""
    return any(pattern in module_name for pattern in DEFAULT_EXCLUDE)


def default_linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights :func:`quantize_weights_` converts by default: those of nn.Linear modules whose
    names contain none of DEFAULT_EXCLUDE, unless an excluded module also holds them (a head
    tied to an embedding stays with the embedding). In ``named_parameters()`` order."""
    linear_owned: set[int] = set()
    excluded_owned: set[int] = set()
    for module_name, module in model.named_modules():
        if excluded_by_default(module_name):
            excluded_owned.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, nn.Linear):
            linear_owned.add(id(module.weight))
    return [p for p in model.parameters() if id(p) in linear_owned and id(p) not in excluded_owned]

