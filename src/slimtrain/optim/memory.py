"""Memory accounting from the storage of real tensors (bytes, not estimates)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def tensor_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once).

    Tensor subclasses that wrap other tensors (``__tensor_flatten__``, as torchao's quantized
    optimizer states do) count the storages of the tensors they wrap.
    """
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            total += tensor_bytes((getattr(t, name) for name in names), seen)
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class MemoryReport:
    """Bytes by category and the number of model parameters (elements) they serve."""

    num_parameters: int
    categories: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.categories.values())

    def per_parameter(self, category: str | None = None) -> float:
        """Bytes per model parameter of one category, or of everything when None."""
        value = self.total if category is None else self.categories[category]
        return value / max(self.num_parameters, 1)

    def __str__(self) -> str:
        rows = [*self.categories.items(), ("total", self.total)]
        lines = [f"{'category':<18}{'bytes':>14}{'bytes/param':>13}"]
        lines += [f"{k:<18}{v:>14,}{v / max(self.num_parameters, 1):>13.3f}" for k, v in rows]
        return "\n".join(lines)


def memory_report(
    model_or_params: torch.nn.Module | Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> MemoryReport:
    """Measure the bytes of parameters and optimizer state from their storage.

    ``num_parameters`` counts parameter elements. Categories: "parameters" (quantized weights
    count their codes and scales) and, when an optimizer is given, "master_weights" (float32
    copies kept by ``weight_update="master"``) and "optimizer_state" (every other state tensor).
    """
    params = (
        list(model_or_params.parameters())
        if isinstance(model_or_params, torch.nn.Module) else list(model_or_params)
    )
    seen: set = set()
    report = MemoryReport(num_parameters=sum(p.numel() for p in params))
    report.categories["parameters"] = tensor_bytes(params, seen)
    if optimizer is not None:
        states = [(k, v) for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v)]
        report.categories["master_weights"] = tensor_bytes((v for k, v in states if k == "master"), seen)
        report.categories["optimizer_state"] = tensor_bytes((v for k, v in states if k != "master"), seen)
    return report
