"""Optimizers with low-bit states: AdamW, SGD; state storage; memory accounting."""

from slimtrain.optim.adamw import AdamW
from slimtrain.optim.memory import MemoryReport, memory_report
from slimtrain.optim.sgd import SGD

__all__ = ["SGD", "AdamW", "MemoryReport", "memory_report"]
