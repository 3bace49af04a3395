"""QuantizedWeight: a float32-looking tensor whose storage is real low-precision codes + scales.

Autograd, modules and ``model.parameters()`` see a float32 tensor of the weight's shape; the bytes
held are the codes (1 byte per FP8/INT8 element, half a byte per INT4 element) and float32 scales.
Reading it (any op) dequantizes on the fly into a temporary. Writing it in place is reserved to
slimtrain's optimizers (which re-quantize) and to ``copy_`` (``load_state_dict``); any other
in-place op, e.g. from ``torch.optim.AdamW``, raises a TypeError instead of silently corrupting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_leaves, tree_map

from slimtrain.quant.formats import dequantize_weight, quantize_weight


@dataclass(frozen=True)
class WeightFormat:
    """fmt: "fp8_e4m3", "fp8_e5m2", "int8", "int4" or "bf16"; granularity of scales: "tensor",
    "row" or "group" (group_size elements of a row share a scale)."""

    fmt: str
    granularity: str = "row"
    group_size: int = 128


class WeightParts(NamedTuple):
    """The storage of a :class:`QuantizedWeight` as plain tensors: what a compiled optimizer step
    reads and writes (``torch.compile`` traces plain tensors, not tensor subclasses)."""

    codes: torch.Tensor
    scales: torch.Tensor
    format: WeightFormat
    shape: torch.Size


def dequantize_parts(parts: WeightParts) -> torch.Tensor:
    """The float32 weight of ``parts``, shape ``parts.shape`` (a new tensor)."""
    f = parts.format
    return dequantize_weight(parts.codes, parts.scales, f.fmt, parts.shape, f.granularity, f.group_size)


def quantize_parts_(parts: WeightParts, value: torch.Tensor, seed: int | torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Store float ``value`` in ``parts`` (re-quantized, scales recomputed; stochastic rounding
    with ``seed``); returns what is now stored, dequantized, shape ``parts.shape``."""
    f = parts.format
    codes, scales = quantize_weight(value.reshape(parts.shape), f.fmt, f.granularity, f.group_size, seed)
    parts.codes.copy_(codes)
    parts.scales.copy_(scales)
    return dequantize_weight(codes, scales, f.fmt, parts.shape, f.granularity, f.group_size)


_aten = torch.ops.aten
_VIEW_LIKE = {_aten.detach.default, _aten.alias.default}
_ALLOWED_IN_PLACE = {_aten.copy_.default}


class QuantizedWeight(torch.Tensor):
    """A 2-D weight stored as ``codes`` and ``scales`` in ``format`` (a :class:`WeightFormat`)."""

    codes: torch.Tensor
    scales: torch.Tensor
    format: WeightFormat

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scales: torch.Tensor, format: WeightFormat,
                shape: torch.Size, requires_grad: bool = False) -> QuantizedWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=torch.float32, device=codes.device, requires_grad=requires_grad
        )

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, format: WeightFormat,
                 shape: torch.Size, requires_grad: bool = False) -> None:
        self.codes, self.scales, self.format = codes, scales, format

    @classmethod
    def from_float(cls, weight: torch.Tensor, format: WeightFormat, seed: int | None = None
                   ) -> QuantizedWeight:
        """Quantize a float (rows, cols) tensor (nearest rounding, or stochastic with ``seed``)."""
        codes, scales = quantize_weight(weight.detach(), format.fmt, format.granularity,
                                        format.group_size, seed)
        return cls(codes, scales, format, weight.shape)

    def parts(self) -> WeightParts:
        """The codes and scales (the tensors themselves, not copies), format and shape."""
        return WeightParts(self.codes, self.scales, self.format, self.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (a new tensor)."""
        return dequantize_parts(self.parts())

    def quantize_(self, value: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Store float ``value`` (re-quantized, scales recomputed); returns what is now stored,
        dequantized. Used by slimtrain's optimizers."""
        return quantize_parts_(self.parts(), value, seed)

    def __repr__(self) -> str:  # noqa: D105
        return f"QuantizedWeight({tuple(self.shape)}, {self.format})"

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return ["codes", "scales"], (self.format, self.shape)

    @staticmethod
    def __tensor_unflatten__(inner: dict, context: tuple, outer_size: Any, outer_stride: Any
                             ) -> QuantizedWeight:
        format, shape = context
        return QuantizedWeight(inner["codes"], inner["scales"], format, shape)

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (_rebuild, (self.codes, self.scales, self.format, tuple(self.shape), self.requires_grad))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in _VIEW_LIKE and isinstance(first, QuantizedWeight):
            return QuantizedWeight(first.codes, first.scales, first.format, first.shape)
        if func is _aten._to_copy.default and isinstance(first, QuantizedWeight) and set(kwargs) <= {
            "device", "non_blocking"
        }:
            device = kwargs.get("device", first.device)
            return QuantizedWeight(first.codes.to(device), first.scales.to(device), first.format,
                                   first.shape)
        if func is _aten.clone.default and isinstance(first, QuantizedWeight):
            return QuantizedWeight(first.codes.clone(), first.scales.clone(), first.format, first.shape)
        if func in _ALLOWED_IN_PLACE and isinstance(first, QuantizedWeight):
            source = args[1]
            if isinstance(source, QuantizedWeight) and source.format == first.format:
                first.codes.copy_(source.codes)
                first.scales.copy_(source.scales)
            else:
                first.quantize_(source.dequantize() if isinstance(source, QuantizedWeight) else source)
            return first
        written = _written(func, args, kwargs) if func._schema.is_mutable else []
        if any(isinstance(a, QuantizedWeight) for a in written):
            raise TypeError(
                f"{func} would modify a quantized weight in place; quantized weights are updated by "
                "slimtrain's optimizers (st.AdamW, st.SGD), which re-quantize them"
            )
        unwrap = lambda t: t.dequantize() if isinstance(t, QuantizedWeight) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _written(func: Any, args: tuple, kwargs: dict) -> list:
    """The tensors that ``func`` writes to: the arguments its schema marks as mutable, lists of
    tensors (foreach and fused optimizer ops) flattened."""
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += tree_leaves(args[position] if position < len(args) else kwargs.get(argument.name))
    return written


def _rebuild(codes: torch.Tensor, scales: torch.Tensor, format: WeightFormat, shape: tuple,
             requires_grad: bool) -> torch.Tensor:
    weight = QuantizedWeight(codes, scales, format, torch.Size(shape))
    return torch.nn.Parameter(weight, requires_grad=requires_grad) if requires_grad else weight


torch.serialization.add_safe_globals([QuantizedWeight, WeightFormat, _rebuild])


def is_low_precision(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored below float32 (a QuantizedWeight or a bf16/fp16 tensor)."""
    return isinstance(param, QuantizedWeight) or param.dtype in (torch.bfloat16, torch.float16)


def read_weight(param: torch.Tensor | WeightParts) -> torch.Tensor:
    """``param`` as a flat float32 tensor: itself (or a view) for float32, else a decoded copy."""
    if isinstance(param, QuantizedWeight):
        param = param.parts()
    if isinstance(param, WeightParts):
        return dequantize_parts(param).view(-1)
    if param.dtype == torch.float32:
        return param if param.dim() == 1 else param.view(-1)
    return param.float().view(-1)


def store_weight_(param: torch.Tensor | WeightParts, value: torch.Tensor,
                  seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """Write float32 ``value`` into low-precision ``param`` (nearest rounding, or stochastic with
    ``seed``; FP16 is always nearest). Returns what is now stored, as a flat float32 tensor."""
    if isinstance(param, QuantizedWeight):
        param = param.parts()
    if isinstance(param, WeightParts):
        return quantize_parts_(param, value, seed).view(-1)
    if seed is not None and param.dtype == torch.bfloat16:
        value = quantize_weight(value.view(1, -1), "bf16", seed=seed)[0]
    param.copy_(value.view_as(param))
    return param.float().view(-1)
