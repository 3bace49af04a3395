"""Pure update rules on float32 tensors, written op for op like torch.optim's single-tensor path
so that 32-bit states reproduce torch.optim.AdamW / SGD bit for bit."""

from __future__ import annotations

import torch


def adamw_update_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
    step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """One AdamW step (decoupled weight decay) in place on ``param``, ``exp_avg``, ``exp_avg_sq``.

    All tensors float32 of one shape; ``step`` is the count including this step (>= 1).
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_update_(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None, *, first: bool,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
) -> None:
    """One SGD step in place on ``param`` and ``momentum_buffer`` (None: no momentum).

    The buffer becomes the gradient on the ``first`` step, then
    buf = momentum * buf + (1 - dampening) * g, with g including coupled weight decay.
    """
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum_buffer is not None:
        if first:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)
