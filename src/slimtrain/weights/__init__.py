"""Quantized weight parameters and model conversion."""

from slimtrain.weights.convert import DEFAULT_EXCLUDE, quantize_weights_
from slimtrain.weights.linear import QuantizedLinear
from slimtrain.weights.tensor import QuantizedWeight, WeightFormat

__all__ = ["DEFAULT_EXCLUDE", "QuantizedLinear", "QuantizedWeight", "WeightFormat", "quantize_weights_"]
