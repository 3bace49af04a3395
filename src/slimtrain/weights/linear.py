"""Linear layers on quantized weights: forward and backward dequantize one layer at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtrain.weights.tensor import QuantizedWeight


class _QuantizedLinearFunction(torch.autograd.Function):
    """y = x W^T + b, saving the quantized W (not a float copy) and dequantizing again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        w = weight.dequantize().to(x.dtype)
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        w = weight.dequantize().to(grad_out.dtype)
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None
        flat_grad, flat_x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = (flat_grad.t() @ flat_x).float() if ctx.needs_input_grad[1] else None
        grad_b = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a :class:`QuantizedWeight` (made by ``quantize_weights_``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedLinearFunction.apply(x, self.weight, self.bias)
