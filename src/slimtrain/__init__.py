"""slimtrain: train neural networks in a fraction of the usual memory and network traffic."""

from slimtrain.optim import SGD, AdamW, MemoryReport, memory_report

__all__ = ["SGD", "AdamW", "MemoryReport", "memory_report"]
__version__ = "0.1.0"
