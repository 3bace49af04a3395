"""Pure update rules on float32 tensors, written op for op like torch.optim's single-tensor path
so that 32-bit states reproduce torch.optim.AdamW / SGD bit for bit, or (``reproducible=True``)
from separately rounded +, -, *, / and a correctly rounded square root only, which the C kernel
of :mod:`slimtrain.optim.kernels` reproduces bit for bit (torch's own lerp and addcmul may fuse a
multiply-add, and its float32 sqrt may be one ulp off, depending on the CPU)."""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor


def adam_step_scalars(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """(step_size, sqrt of the second bias correction) of Adam at ``step`` (>= 1), as torch computes
    them. Kept out of :func:`adamw_update_` so that a compiled update does not specialize on step."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def adamw_update_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    decay: Scalar, beta1: Scalar, beta2: Scalar, eps: Scalar, step_size: Scalar,
    bias_correction2_sqrt: Scalar, reproducible: bool = False,
) -> None:
    """One AdamW step in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (float32, one shape).

    decay = 1 - lr * weight_decay (decoupled); step_size and bias_correction2_sqrt come from
    :func:`adam_step_scalars`. Scalars are Python floats or 0-d float32 tensors (for a compiled
    caller); either way each op rounds as torch.optim.AdamW's single-tensor path does.
    """
    param.mul_(decay)
    if reproducible:
        exp_avg.add_((grad - exp_avg) * (1 - beta1))
        exp_avg_sq.mul_(beta2).add_(grad * (1 - beta2) * grad)
    else:
        exp_avg.lerp_(grad, 1 - beta1)
        _addcmul_(exp_avg_sq.mul_(beta2), grad, grad, 1 - beta2)
    _addcdiv_(param, exp_avg, adam_denominator(exp_avg_sq, bias_correction2_sqrt, eps, reproducible),
              -step_size)


def adam_denominator(exp_avg_sq: torch.Tensor, bias_correction2_sqrt: Scalar, eps: Scalar,
                     reproducible: bool = False) -> torch.Tensor:
    """sqrt(v) / sqrt(1 - beta2^t) + eps, a new float32 tensor. ``reproducible``: the square
    root correctly rounded (through float64) and multiplied by the reciprocal of the correction."""
    if reproducible:
        return (exp_avg_sq.double().sqrt().float() * (1 / bias_correction2_sqrt)).add_(eps)
    return (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)


def _addcmul_(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Scalar) -> torch.Tensor:
    """x += value * a * b: torch's fused kernel for a float ``value``, plain ops for a tensor one."""
    return x.addcmul_(a, b, value=value) if isinstance(value, float) else x.add_(value * a * b)


def _addcdiv_(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Scalar) -> torch.Tensor:
    """x += value * a / b: torch's fused kernel for a float ``value``, plain ops for a tensor one."""
    return x.addcdiv_(a, b, value=value) if isinstance(value, float) else x.add_(value * (a / b))


def sgd_update_(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None, *, first: bool,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    reproducible: bool = False,
) -> None:
    """One SGD step in place on ``param`` and ``momentum_buffer`` (None: no momentum).

    The buffer becomes the gradient on the ``first`` step, then
    buf = momentum * buf + (1 - dampening) * g, with g including coupled weight decay.
    ``reproducible``: every product rounded apart from its sum (torch's add with alpha may fuse
    them), as the C kernel of :mod:`slimtrain.optim.kernels` computes it.
    """
    def plus(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:  # x + alpha * y
        return x + y * alpha if reproducible else x.add(y, alpha=alpha)

    def plus_(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:  # in place
        return x.add_(y * alpha) if reproducible else x.add_(y, alpha=alpha)

    if weight_decay != 0:
        grad = plus(grad, param, weight_decay)
    if momentum_buffer is not None:
        if first:
            momentum_buffer.copy_(grad)
        else:
            plus_(momentum_buffer.mul_(momentum), grad, 1 - dampening)
        grad = plus(grad, momentum_buffer, momentum) if nesterov else momentum_buffer
    plus_(param, grad, -lr)
