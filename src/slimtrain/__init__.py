"""slimtrain: train neural networks in a fraction of the usual memory and network traffic."""

from slimtrain.distributed import DiLoCo, LoRDO
from slimtrain.optim import SGD, AdamW, MemoryReport, memory_report
from slimtrain.weights import QuantizedWeight, WeightFormat, quantize_weights_

__all__ = [
    "SGD", "AdamW", "DiLoCo", "LoRDO", "MemoryReport", "QuantizedWeight", "WeightFormat", "memory_report",
    "quantize_weights_",
]
__version__ = "0.1.0"
