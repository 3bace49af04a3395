"""Low-rank Adam: projections, the low-rank moment update, LoRDO's local step, and a
GaLore-style optimizer (the low-rank DDP baseline).

Shapes: a matrix parameter W is (p, q); it is *oriented* so that the projected side is the
smaller one (``oriented(W)`` is W when p <= q, else W.T), giving an (n, m) matrix with n <= m.
Q is (n, r) with orthonormal columns; projected gradients and the moments u, v are (r, m).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from slimtrain.optim.base import check_adam_options, check_choice, run_closure
from slimtrain.optim.functional import adam_step_scalars, adamw_update_

SVD_METHODS = ("full", "randomized")
FULL_RANK_SCALES = ("mean_v", "rms")
MOMENT_POLICIES = ("keep", "rotate", "reset")
RANDOMIZED_OVERSAMPLING = 8
RANDOMIZED_POWER_ITERATIONS = 2


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (p, q) as a view whose first side is the smaller: itself or its transpose."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def top_singular_vectors(
    matrix: torch.Tensor, rank: int, method: str = "full", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``matrix`` (n, m): (n, rank) float32, orthonormal.

    "full": torch.linalg.svd. "randomized": a range finder (Halko et al.) with
    RANDOMIZED_OVERSAMPLING extra columns and RANDOMIZED_POWER_ITERATIONS power iterations, its
    Gaussian test matrix drawn from ``generator`` (so every rank can draw the same one; None:
    torch's global generator). Deterministic for a given input on a given device ("randomized":
    and a given generator state).
    """
    matrix = matrix.float()
    if method == "full":
        return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank].contiguous()
    columns = min(rank + RANDOMIZED_OVERSAMPLING, min(matrix.shape))
    test = torch.randn(matrix.shape[1], columns, generator=generator, device="cpu").to(matrix.device)
    basis = torch.linalg.qr(matrix @ test)[0]
    for _ in range(RANDOMIZED_POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ (matrix.T @ basis))[0]
    small = torch.linalg.svd(basis.T @ matrix, full_matrices=False)[0]
    return (basis @ small)[:, :rank].contiguous()


def largest_principal_angle(first: torch.Tensor, second: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spans of two (n, r) orthonormal
    bases: 0 when the subspaces are equal, pi/2 when some direction of one is orthogonal to the other."""
    cosines = torch.linalg.svdvals(first.double().T @ second.double())
    return math.acos(min(1.0, cosines.min().item()))


def low_rank_adam_direction(
    projected: torch.Tensor,
    basis: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update the low-rank moments (r, m) in place with ``projected`` gradient (r, m); return
    (Q (û / (√v̂ + ε)) of shape (n, m), v̂ of shape (r, m))."""
    exp_avg.lerp_(projected, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(projected, projected, value=1 - beta2)
    corrected_sq = exp_avg_sq / (1 - beta2**step)
    direction = (exp_avg / (1 - beta1**step)) / (corrected_sq.sqrt() + eps)
    return basis @ direction, corrected_sq


def lordo_local_step_(
    weight: torch.Tensor,
    grad: torch.Tensor,
    error: torch.Tensor | None,
    basis: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    omega: float,
    mu: float,
    step: int,
    full_rank_scale: str,
) -> None:
    """LoRDO's per-worker step on an oriented float32 weight (n, m), in place.

    A = G + E; g = Qᵀ A; E = A - Q g (skipped when ``error`` is None: no error feedback);
    low-rank Adam on g; W -= lr [(1 - ω) D_full + ω D_low] + lr λ W, with
    D_full = G / (μ (√v̄ + ε)), v̄ the mean of v̂ over its r rows ("mean_v"), or
    D_full = G / (μ (rms(G) + ε)) ("rms").
    """
    accumulated = grad if error is None else grad + error
    projected = basis.T @ accumulated
    if error is not None:
        error.copy_(accumulated - basis @ projected)
    low, corrected_sq = low_rank_adam_direction(
        projected, basis, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, step=step
    )
    if full_rank_scale == "mean_v":
        scale = corrected_sq.mean(dim=0, keepdim=True).sqrt() + eps
    else:
        scale = grad.square().mean().sqrt() + eps
    update = (1 - omega) * (grad / (mu * scale)) + omega * low
    weight.mul_(1 - lr * weight_decay).sub_(update, alpha=lr)


def refresh_moments_(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    old_basis: torch.Tensor,
    new_basis: torch.Tensor,
    policy: str,
) -> None:
    """Carry the low-rank moments (r, m) over a change of projection: "keep" them as they are,
    "rotate" them into the new basis (u <- R u, v <- (R∘R) v with R = Q_newᵀ Q_old, which keeps
    v non-negative), or "reset" them to zero."""
    if policy == "reset":
        exp_avg.zero_()
        exp_avg_sq.zero_()
    elif policy == "rotate":
        rotation = new_basis.T @ old_basis
        exp_avg.copy_(rotation @ exp_avg)
        exp_avg_sq.copy_(rotation.square() @ exp_avg_sq)


def check_low_rank_options(rank: int, svd: str, moments_on_refresh: str) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    check_choice("svd", svd, SVD_METHODS)
    check_choice("moments_on_refresh", moments_on_refresh, MOMENT_POLICIES)


def is_low_rank(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param`` of ``group`` takes low-rank steps: a 2-D tensor whose smaller side
    exceeds the rank, in a group with ``low_rank`` True."""
    return group["low_rank"] and param.dim() == 2 and min(param.shape) > group["rank"]


def local_adamw_(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]) -> None:
    """A plain AdamW step on a float32 tensor with float32 moments in ``state`` (created when
    missing); ``state["step"]`` is advanced."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
    state["step"] = state.get("step", 0) + 1
    beta1, beta2 = group["betas"]
    step_size, bias_correction2_sqrt = adam_step_scalars(group["lr"], beta1, beta2, state["step"])
    adamw_update_(
        param,
        grad,
        state["exp_avg"],
        state["exp_avg_sq"],
        decay=1 - group["lr"] * group["weight_decay"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
    )


class LowRankAdamW(torch.optim.Optimizer):
    """GaLore-style AdamW: matrix parameters keep Adam moments of their gradient projected on
    the top-``rank`` left singular vectors of the gradient, recomputed every ``refresh_every``
    steps; other parameters (and groups with ``low_rank=False``) take plain AdamW steps.

    Used under DistributedDataParallel (which averages the gradients) as the low-rank DDP
    baseline. float32 parameters only.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        rank: int = 32,
        refresh_every: int = 200,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        scale: float = 1.0,
        svd: str = "full",
        moments_on_refresh: str = "keep",
        low_rank: bool = True,
    ) -> None:
        check_adam_options(lr, betas, eps, weight_decay)
        check_low_rank_options(rank, svd, moments_on_refresh)
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive integer, got {refresh_every!r}")
        defaults = dict(lr=lr, rank=rank, refresh_every=refresh_every, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, scale=scale, svd=svd,
                        moments_on_refresh=moments_on_refresh, low_rank=low_rank)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        stepped = [(param, group) for group in self.param_groups for param in group["params"]
                   if param.grad is not None]
        for param, _ in stepped:  # before any parameter is updated
            if param.dtype != torch.float32:
                raise TypeError(f"LowRankAdamW updates float32 parameters, got {param.dtype}")
        for param, group in stepped:
            state = self.state[param]
            if is_low_rank(param, group):
                self._low_rank_step(param, param.grad, state, group)
            else:
                local_adamw_(param, param.grad, state, group)
        return loss

    @staticmethod
    def _low_rank_step(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]) -> None:
        grad = oriented(grad.float())
        rank = group["rank"]
        step = state.get("step", 0)
        if step % group["refresh_every"] == 0:
            basis = top_singular_vectors(grad, rank, group["svd"])
            if "basis" in state:
                refresh_moments_(
                    state["exp_avg"], state["exp_avg_sq"], state["basis"], basis, group["moments_on_refresh"]
                )
            else:
                state["exp_avg"] = grad.new_zeros(rank, grad.shape[1])
                state["exp_avg_sq"] = grad.new_zeros(rank, grad.shape[1])
            state["basis"] = basis
        state["step"] = step + 1
        beta1, beta2 = group["betas"]
        direction, _ = low_rank_adam_direction(
            state["basis"].T @ grad,
            state["basis"],
            state["exp_avg"],
            state["exp_avg_sq"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step=step + 1,
        )
        weight = oriented(param)
        weight.mul_(1 - group["lr"] * group["weight_decay"]).sub_(
            direction, alpha=group["lr"] * group["scale"]
        )
