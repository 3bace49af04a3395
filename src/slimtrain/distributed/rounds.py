"""Training with infrequent synchronization: DiLoCo and LoRDO on torch.distributed.

Every worker takes ``sync_every`` local steps; then one round: the pseudo-gradients
Δ_m = W_m - W_anchor of all parameters are averaged with one all-reduce (the only collective),
the anchor takes the outer step (plain averaging when outer_lr = 1 and outer_momentum = 0, or
Nesterov momentum as in DiLoCo), and every worker restarts from the new anchor, so that all
ranks hold bitwise identical parameters after every round.

Parameters stored below float32 (quantized weights, bf16) take their local steps on a float32
copy and are stored back with stochastic rounding. Their anchor is either float32 (``anchor=
"float32"``: it re-quantizes them at every round, so rounding errors never outlive a round) or
kept in the weight's own low-precision storage (``anchor="eco"``: no float32 copy of the weights
at all). Then the outer step's rounding error e = intended - stored is fed back into the outer
Nesterov buffer, ECO's idea applied to the outer optimizer: adding c e to the buffer b adds
outer_lr * c * (mu^2 + mu^3 + ...) e = outer_lr * c * mu^2 / (1 - mu) e to later anchors, so
c = (1 - mu) / (outer_lr * mu^2) returns exactly the lost e (mu = outer_momentum).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from slimtrain.distributed.comm import Collectives
from slimtrain.optim.base import (
    as_pair,
    check_adam_options,
    check_block_size,
    check_choice,
    check_number,
    checked_generator,
    load_state_uncast,
    resolve_seed,
    run_closure,
)
from slimtrain.optim.lowrank import (
    FULL_RANK_SCALES,
    check_low_rank_options,
    is_low_rank,
    local_adamw_,
    lordo_local_step_,
    oriented,
    refresh_moments_,
    top_singular_vectors,
)
from slimtrain.optim.state import STATE_BITS, StateFormat, init_state, read_state, write_state
from slimtrain.quant import draw_seed
from slimtrain.weights.tensor import is_low_precision, read_weight, store_weight_

PROJECTIONS = ("global", "local")
ANCHORS = ("float32", "eco")


class RoundsOptimizer(torch.optim.Optimizer):
    """Local steps with a round every ``sync_every`` steps (see the module docstring).

    Subclasses define :meth:`local_step`. ``clip``: global gradient-norm clipping of the local
    gradient (None: off). ``process_group``: the workers (default: torch.distributed's default
    group; a single worker when torch.distributed is not initialized). ``seed``: of the
    stochastic rounding, offset by the rank (None: ``torch.initial_seed()``). Bytes sent are
    counted in ``self.collectives.sent``.
    """

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        sync_every: int,
        outer_lr: float,
        outer_momentum: float,
        clip: float | None,
        process_group: Any,
        seed: int | None,
        anchor: str = "float32",
    ) -> None:
        check_adam_options(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        seed = resolve_seed(seed)
        check_choice("anchor", anchor, ANCHORS)
        if anchor == "eco" and outer_momentum <= 0:
            raise ValueError("anchor='eco' feeds the anchor's rounding error into the outer momentum: "
                             "it needs outer_momentum > 0")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be a positive integer, got {sync_every!r}")
        check_number("outer_lr", outer_lr, 0.0, math.inf, low_open=True)
        check_number("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        if clip is not None:
            check_number("clip", clip, 0.0, math.inf, low_open=True)
        super().__init__(params, defaults)
        self.sync_every, self.outer_lr, self.outer_momentum, self.clip = (
            sync_every,
            outer_lr,
            outer_momentum,
            clip,
        )
        self.anchor = anchor
        self.collectives = Collectives(process_group)
        self.local_steps = 0
        self.rounds = 0
        self._generator = torch.Generator().manual_seed(seed + 7919 * self.collectives.rank)

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ---------------------------------------------------------------------------- steps
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One local step on every parameter with a gradient; a round after every
        ``sync_every`` local steps."""
        loss = run_closure(closure)
        if self.local_steps == 0:
            self.first_step()
        grads = {id(p): p.grad.float() for p in self.params() if p.grad is not None}
        if self.clip is not None and grads:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
            )
            factor = self.clip / (norm.item() + 1e-6)
            if factor < 1.0:  # no extra pass over the gradients when nothing is clipped
                grads = {k: g * factor for k, g in grads.items()}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "anchor" not in state:
                    state["anchor"] = (param.detach().clone() if self._eco_anchor(param)
                                       else read_weight(param).view(param.shape).clone())
                weight = read_weight(param).view(param.shape).clone() if is_low_precision(param) else param
                self.local_step(weight, grads[id(param)], state, group)
                if weight is not param:
                    store_weight_(param, weight, draw_seed(self._generator))
        self.local_steps += 1
        if self.local_steps % self.sync_every == 0:
            self.synchronize()
        return loss

    def first_step(self) -> None:
        """Called before the first local step (LoRDO computes its first projection here)."""

    def local_step(
        self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]
    ) -> None:
        """Update float32 ``weight`` in place from float32 ``grad`` (clipped)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- rounds
    @torch.no_grad()
    def synchronize(self) -> None:
        """One round now: average the pseudo-gradients, take the outer step, restart every worker
        from the new anchor. The trainer also calls it after the last step."""
        params = [p for p in self.params() if "anchor" in self.state[p]]
        if not params:
            return
        deltas = [read_weight(p) - self._restart_point(p) for p in params]
        self.before_average(params, deltas)
        flat = self.collectives.all_reduce_mean_(torch.cat(deltas), "pseudo-gradients")
        averaged = dict(zip(map(id, params), flat.split([d.numel() for d in deltas]), strict=True))
        for param in params:
            state, delta = self.state[param], averaged[id(param)].view(param.shape)
            buffer = None
            if self.outer_momentum > 0:
                buffer = state.setdefault("outer_buffer", torch.zeros_like(delta))
                buffer.mul_(self.outer_momentum).add_(delta)
                delta = delta + self.outer_momentum * buffer  # Nesterov
            anchor = state["anchor"]
            if self._eco_anchor(param):  # nearest rounding: the same anchor on every rank
                intended = read_weight(anchor).view(param.shape) + self.outer_lr * delta
                stored = store_weight_(anchor, intended).view(param.shape)
                mu = self.outer_momentum
                buffer.add_((intended - stored) * ((1 - mu) / (self.outer_lr * mu**2)))
                param.copy_(anchor)
            else:
                anchor.add_(delta, alpha=self.outer_lr)
                if is_low_precision(param):
                    store_weight_(param, anchor)
                else:
                    param.copy_(anchor)
        self.after_average(params, averaged)
        self.rounds += 1

    def _restart_point(self, param: torch.Tensor) -> torch.Tensor:
        """Where this round's local steps started, flat float32: the anchor as ``param`` stores it.

        A float32 anchor of a low-precision parameter is rounded (to nearest) when the workers
        restart from it; measuring the pseudo-gradient from the rounded point keeps that rounding
        error out of the outer step (from the float32 anchor, the outer step would pull the anchor
        back towards the nearest representable weights, round after round).
        """
        anchor = self.state[param]["anchor"]
        if not is_low_precision(param) or self._eco_anchor(param):
            return read_weight(anchor)
        restarted = param.detach().clone()  # same storage format (codes and scales are copied)
        return store_weight_(restarted, anchor)

    def _eco_anchor(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s anchor lives in its own low-precision storage (``anchor="eco"``)."""
        return self.anchor == "eco" and is_low_precision(param)

    def before_average(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        """Hook on this worker's own pseudo-gradients (flat), before they are averaged."""

    def after_average(self, params: list[torch.Tensor], averaged: dict[int, torch.Tensor]) -> None:
        """Hook on the averaged pseudo-gradients (flat, by parameter id), after the outer step."""

    # ------------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus the step and round counters and the rounding generator."""
        return {
            **super().state_dict(),
            "local_steps": self.local_steps,
            "rounds": self.rounds,
            "rng_state": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load without casting states to the parameters' dtype (anchors stay float32)."""
        for key in ("local_steps", "rounds", "rng_state"):
            if key not in state_dict:
                raise ValueError(f"state_dict lacks {key!r}: it was not saved by {type(self).__name__}")
        generator = checked_generator(state_dict["rng_state"])
        load_state_uncast(self, state_dict)
        self.local_steps, self.rounds = int(state_dict["local_steps"]), int(state_dict["rounds"])
        self._generator = generator


class DiLoCo(RoundsOptimizer):
    """DiLoCo: local AdamW, and every ``sync_every`` steps an outer Nesterov step on the averaged
    pseudo-gradient (outer_lr 0.7, outer_momentum 0.9 by default, as in the DiLoCo paper).
    ``anchor``: "float32" or "eco", as for :class:`LoRDO`."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        sync_every: int = 16,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        clip: float | None = 1.0,
        process_group: Any = None,
        seed: int | None = 0,
        anchor: str = "float32",
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, sync_every, outer_lr, outer_momentum, clip, process_group, seed,
                         anchor)

    def local_step(
        self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]
    ) -> None:
        local_adamw_(weight, grad, state, group)


class LoRDO(RoundsOptimizer):
    """LoRDO: low-rank local Adam in a projection shared by all workers, error feedback, and a
    full-rank term, with DiLoCo-style rounds (see ``specs/lordo.md``).

    Matrix parameters (2-D, smaller side > ``rank``, in groups with ``low_rank=True``) keep
    moments u, v of shape (rank, larger side); the projection Q is the top-``rank`` left singular
    vectors of the averaged pseudo-gradient, refreshed every round ("global"), or of each
    worker's own ("local": a baseline variant). Other parameters take local AdamW steps.

    Args:
        lr, betas, eps, weight_decay: of the local steps. rank: r. sync_every: K local steps per round.
        omega: weight of the low-rank direction (1 - omega on the full-rank term); 1 disables it.
        mu: divisor of the full-rank term. full_rank_scale: its denominator, "mean_v" (the mean of
            v̂ over the r rows, per column) or "rms" (the gradient's own RMS).
        clip: global gradient-norm clipping (None: off). outer_lr, outer_momentum: the outer step
            (Nesterov; outer_lr=1, outer_momentum=0 is plain averaging). Default 0.7 and 0.9, as
            DiLoCo: on the benchmark it gave 2.056 against 2.123 for plain averaging.
        error_feedback: keep E, the part of the gradient outside span(Q), for later steps.
        moments_on_refresh: "keep", "rotate" or "reset" u and v when Q changes.
        svd: "full" or "randomized". projection: "global" or "local".
        state_bits: bits of (u, v): 32 (float32) or SOLO's 8, 4, 3, 2 (u: dynamic-exponent map
            with block absmax; v: logarithmic map), block_size elements per scale.
        anchor: for weights stored below float32, "float32" (a float32 anchor) or "eco" (the
            anchor in the weights' own storage, its rounding error fed into the outer momentum;
            see the module docstring).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        rank: int = 32,
        sync_every: int = 16,
        omega: float = 0.5,
        mu: float = 1.0,
        clip: float | None = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        process_group: Any = None,
        *,
        full_rank_scale: str = "mean_v",
        error_feedback: bool = True,
        moments_on_refresh: str = "keep",
        svd: str = "full",
        projection: str = "global",
        state_bits: int | tuple[int, int] = (32, 32),
        block_size: int = 128,
        low_rank: bool = True,
        seed: int | None = 0,
        anchor: str = "float32",
    ) -> None:
        check_low_rank_options(rank, svd, moments_on_refresh)
        check_number("omega", omega, 0.0, 1.0)
        check_number("mu", mu, 0.0, math.inf, low_open=True)
        check_choice("full_rank_scale", full_rank_scale, FULL_RANK_SCALES)
        check_choice("projection", projection, PROJECTIONS)
        check_block_size(block_size)
        state_bits = as_pair("state_bits", state_bits, tuple(b for b in STATE_BITS if b != 16))
        defaults = dict(lr=lr, rank=rank, omega=omega, mu=mu, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, low_rank=low_rank)
        super().__init__(params, defaults, sync_every, outer_lr, outer_momentum, clip, process_group, seed,
                         anchor)
        self.options = dict(
            full_rank_scale=full_rank_scale,
            error_feedback=error_feedback,
            moments_on_refresh=moments_on_refresh,
            svd=svd,
            projection=projection,
        )
        self.moment_formats = {
            "exp_avg": StateFormat(state_bits[0], signed=True, kind="dynamic", block_size=block_size),
            "exp_avg_sq": StateFormat(
                state_bits[1], signed=False, kind="log", block_size=block_size, stochastic=True
            ),
        }

    def _low_rank_params(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if is_low_rank(p, g)]

    def _projection(self, matrix: torch.Tensor, rank: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.rounds)  # the same draw on every rank
        return top_singular_vectors(oriented(matrix), rank, self.options["svd"], generator)

    def first_step(self) -> None:
        """The first projection: from the gradients averaged once over the workers ("global")."""
        matrices = [(p, g) for p, g in self._low_rank_params() if p.grad is not None]
        if not matrices:
            return
        grads = [p.grad.float().reshape(-1) for p, _ in matrices]
        if self.options["projection"] == "global":
            flat = self.collectives.all_reduce_mean_(torch.cat(grads), "first projection")
            grads = list(flat.split([g.numel() for g in grads]))
        for (param, group), grad in zip(matrices, grads, strict=True):
            self._set_basis(param, group, self._projection(grad.view(param.shape), group["rank"]))

    @staticmethod
    def _moments_like(tensor: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """An uninitialized tensor of the low-rank moments' shape, (rank, larger side of
        ``tensor``), on its device: what the state functions take for a shape."""
        return torch.empty(group["rank"], oriented(tensor).shape[1], device=tensor.device)

    def _read_moments(self, state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: read_state(state, name, fmt, like) for name, fmt in self.moment_formats.items()}

    def _write_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        for name, fmt in self.moment_formats.items():
            write_state(state, name, fmt, moments[name], draw_seed(self._generator))

    def _set_basis(self, param: torch.Tensor, group: dict[str, Any], basis: torch.Tensor) -> None:
        state = self.state[param]
        like = self._moments_like(param, group)
        if "basis" not in state:
            for name, fmt in self.moment_formats.items():
                init_state(state, name, fmt, like)
            if self.options["error_feedback"]:
                state["error"] = torch.zeros(oriented(param).shape, device=param.device)
        elif self.options["moments_on_refresh"] != "keep":
            moments = self._read_moments(state, like)
            refresh_moments_(
                moments["exp_avg"],
                moments["exp_avg_sq"],
                state["basis"],
                basis,
                self.options["moments_on_refresh"],
            )
            self._write_moments(state, moments)
        state["basis"] = basis

    def local_step(
        self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]
    ) -> None:
        if "basis" not in state:
            local_adamw_(weight, grad, state, group)
            return
        state["step"] = state.get("step", 0) + 1
        moments = self._read_moments(state, self._moments_like(weight, group))
        beta1, beta2 = group["betas"]
        lordo_local_step_(
            oriented(weight),
            oriented(grad),
            state.get("error"),
            state["basis"],
            moments["exp_avg"],
            moments["exp_avg_sq"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            omega=group["omega"],
            mu=group["mu"],
            step=state["step"],
            full_rank_scale=self.options["full_rank_scale"],
        )
        self._write_moments(state, moments)

    def before_average(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        if self.options["projection"] == "local":
            self._refresh(params, deltas)

    def after_average(self, params: list[torch.Tensor], averaged: dict[int, torch.Tensor]) -> None:
        if self.options["projection"] == "global":
            self._refresh(params, [averaged[id(p)] for p in params])

    def _refresh(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        """A new projection for every matrix parameter from its pseudo-gradient."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for param, delta in zip(params, deltas, strict=True):
            group = group_of[id(param)]
            if is_low_rank(param, group) and "basis" in self.state[param]:
                self._set_basis(param, group, self._projection(delta.view(param.shape), group["rank"]))
