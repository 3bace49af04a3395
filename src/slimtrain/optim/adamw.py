"""AdamW with optimizer states stored at 32, 16, 8, 4, 3 or 2 bits (SOLO)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from slimtrain.optim import kernels
from slimtrain.optim.base import LowBitOptimizer, as_pair, check_adam_options, check_choice, plain_float32
from slimtrain.optim.functional import adam_denominator, adam_step_scalars, adamw_update_
from slimtrain.optim.state import SIGNED_MAPS, STATE_BITS, UNSIGNED_MAPS, StateFormat, scaled_beta
from slimtrain.quant import ROUNDING_MODES
from slimtrain.weights.tensor import QuantizedWeight

BETA1_POLICIES = ("scaled", "fixed")



def adamw_rule(
    param: torch.Tensor, grad: torch.Tensor, states: dict, scalars: dict, first: bool
) -> None:
    """The update rule on float32 chunks (see :func:`slimtrain.optim.base.step_chunk_`)."""
    adamw_update_(
        param, grad, states["exp_avg"], states["exp_avg_sq"], decay=scalars["decay"],
        beta1=scalars["beta1"], beta2=scalars["beta2"], eps=scalars["eps"],
        step_size=scalars["step_size"], bias_correction2_sqrt=scalars["bias_correction2_sqrt"],
        reproducible=scalars["reproducible"],
    )


def adamw_eco_injection(states: dict, error: torch.Tensor, scalars: dict) -> None:
    """ECO for Adam: m += ((1 - beta1^t) / lr) (1 - 1/beta1) d * e, d this step's denominator
    (v is not modified); ``scalars["eco_scale"]`` holds the scalar factor."""
    denom = adam_denominator(states["exp_avg_sq"], scalars["bias_correction2_sqrt"], scalars["eps"],
                             scalars["reproducible"])
    states["exp_avg"].add_(scalars["eco_scale"] * denom * error)


def torch_fused_step(param: torch.Tensor, state: dict, group: dict[str, Any], maximize: bool) -> bool:
    """The step of a plain float32 ``param`` with float32 states, under ``group``'s lr, betas,
    eps and weight decay, through torch's fused AdamW kernel (CPU or GPU; ``state["step"]``
    already advanced); False where this torch has none."""
    fused = getattr(torch, "_fused_adamw_", None)
    if fused is None or not plain_float32(param):
        return False
    step = state["step"].to(param.device)  # a copy on a GPU, where torch's kernel reads it
    fused([param], [param.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [step],
          lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
          weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=maximize)
    return True


class AdamW(LowBitOptimizer):
    """AdamW (decoupled weight decay) whose moments m and v can be stored in a few bits.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay, maximize: as in ``torch.optim.AdamW``.
        state_bits: bits of (m, v), each 32, 16, 8, 4, 3 or 2 (one int sets both). 32 keeps
            float32 states and matches ``torch.optim.AdamW`` bit for bit: ``fused=True``'s bits
            with ``compile=True`` (torch's fused kernel runs the step), the default single-tensor
            path's with ``compile=False``. 16 keeps bfloat16.
        state_maps: level maps of (m, v) below 16 bits. m: "dynamic" (dynamic exponent) or
            "linear"; v: "log" (SOLO's logarithmic levels), "dynamic" or "linear".
        state_rounding: rounding of (m, v) when encoded: "nearest" or "stochastic".
        block_size: elements per quantization scale (a multiple of 8). quantile: p of the log map.
        min_quantized_numel: tensors with fewer elements keep float32 states.
        beta1_policy: "scaled" lowers beta1 for low-bit m so that its quantization noise matches
            that of ``betas[0]`` at ``beta1_reference_bits`` bits (SOLO); "fixed" keeps betas[0].
        weight_update: how parameters stored below float32 (quantized weights, bf16/fp16) are
            updated: "master" (a float32 copy in the optimizer state), "naive" (update, round,
            drop the error) or "eco" (round and feed the error back into m; no master copy).
        rounding: "nearest" or "stochastic" rounding of those parameters.
        eco_decay_correction: multiply ECO's injection by (1 - lr * weight_decay).
        compile: run steps fused: float32 parameters with float32 states go through torch's
            fused AdamW kernel; on the CPU, float32 parameters with quantized states and FP8/INT8/INT4
            weights with row or group scales ("eco" or "naive" updates) through a hand-written C
            kernel (one pass over each tensor, built once per machine, the same bits as the eager step);
            on CUDA, SOLO states of float32 parameters and of those weights through hand-written
            Triton kernels (the same bits as the eager step). Other quantized states go through
            ``torch.compile`` (one pass per chunk of 2^20 elements on the CPU, 2^24 elsewhere;
            compiled once per state format and shape family). Everything else, and
            ``compile=False``, runs as eager torch code.
        seed: seed of the stochastic-rounding generator (saved in ``state_dict``); default
            ``torch.initial_seed()``.
    """

    state_names = ("exp_avg", "exp_avg_sq")
    state_signed = (True, False)

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2, *,
        state_bits: int | tuple[int, int] = 32,
        state_maps: tuple[str, str] = ("dynamic", "log"),
        state_rounding: tuple[str, str] = ("nearest", "stochastic"),
        block_size: int = 128, quantile: float = 0.1, min_quantized_numel: int = 4096,
        beta1_policy: str = "scaled", beta1_reference_bits: int = 5,
        weight_update: str = "eco", rounding: str = "nearest", eco_decay_correction: bool = True,
        maximize: bool = False, compile: bool = True, seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            state_bits=state_bits, state_maps=state_maps, state_rounding=state_rounding,
            block_size=block_size,
            quantile=quantile, min_quantized_numel=min_quantized_numel,
            beta1_policy=beta1_policy, beta1_reference_bits=beta1_reference_bits, compile=compile,
            weight_update=weight_update, rounding=rounding, eco_decay_correction=eco_decay_correction,
        )
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        betas = group["betas"]
        check_adam_options(group["lr"], betas, group["eps"], group["weight_decay"])
        maps = group["state_maps"]
        if not isinstance(maps, (tuple, list)) or len(maps) != 2:
            raise ValueError(f"state_maps must be a pair (map of m, map of v), got {maps!r}")
        check_choice("state_maps[0] (map of m)", maps[0], SIGNED_MAPS)
        check_choice("state_maps[1] (map of v)", maps[1], UNSIGNED_MAPS)
        check_choice("beta1_policy", group["beta1_policy"], BETA1_POLICIES)
        check_choice("beta1_reference_bits", group["beta1_reference_bits"], range(2, 9))
        if group["weight_update"] == "eco" and betas[0] == 0:
            raise ValueError("weight_update='eco' needs betas[0] > 0: the error is fed back into m")
        group.update(
            betas=tuple(betas), state_maps=tuple(maps),
            state_bits=as_pair("state_bits", group["state_bits"], STATE_BITS),
            state_rounding=as_pair("state_rounding", group["state_rounding"], ROUNDING_MODES),
        )

    @staticmethod
    def effective_beta1(group: dict[str, Any], m_format: StateFormat) -> float:
        """beta1 used for a first moment stored in ``m_format`` under ``group``'s policy."""
        beta1 = group["betas"][0]
        if group["beta1_policy"] == "fixed" or not m_format.quantized:
            return beta1
        return scaled_beta(beta1, m_format.bits, group["beta1_reference_bits"], m_format.kind)

    rules = (adamw_rule, adamw_eco_injection)

    def _fused_step(
        self, group: dict[str, Any], param: torch.Tensor, formats: dict[str, StateFormat], state: dict,
        scalars: dict[str, Any], seeds: dict[str, int | None], options: tuple[bool, str | None],
        weight_seed: int | None,
    ) -> bool:
        """The step of a parameter in a kernel: torch's fused AdamW for float32 states of a
        float32 tensor (the bits of ``torch.optim.AdamW(fused=True)``); on CUDA, the Triton kernels
        where they cover the formats (see :meth:`_triton_step`); on the CPU, the C kernel (the bits
        of the eager step) for a float32 tensor with quantized states or a QuantizedWeight (float8,
        int8 or int4; row or group scales) updated without a master copy."""
        maximize, weight_update = options
        grad = param.grad
        if (grad.dtype != torch.float32 or set(formats) != {"exp_avg", "exp_avg_sq"}
                or not all(kernels.supported(f) for f in formats.values())):
            return False
        if weight_update is None and not any(f.quantized for f in formats.values()):
            return torch_fused_step(param, state, group, maximize)
        if param.device.type in kernels.TRITON_DEVICES and self._triton_step(
                param, formats, state, scalars, seeds, options, weight_seed):
            return True
        constants = partial(
            kernels.AdamWScalars, decay=scalars["decay"], lerp_weight=1 - scalars["beta1"],
            beta2=scalars["beta2"], one_minus_beta2=1 - scalars["beta2"], eps=scalars["eps"],
            inverse_bias_correction2_sqrt=1 / scalars["bias_correction2_sqrt"],
            neg_step_size=-scalars["step_size"], maximize=int(maximize),
        )
        in_order = {name: formats[name] for name in ("exp_avg", "exp_avg_sq")}
        return kernels.c_kernel_step(param, ("adamw_step_blocks", "adamw_step_weight_rows"), state, in_order,
                                     seeds, weight_update, weight_seed, scalars["eco_scale"], constants)

    @staticmethod
    def _triton_step(param: torch.Tensor, formats: dict[str, StateFormat], state: dict,
                     scalars: dict[str, Any], seeds: dict[str, int | None], options: tuple[bool, str | None],
                     weight_seed: int | None) -> bool:
        """The Triton kernels' step of a plain float32 ``param``, or of a float8, int8 or int4
        QuantizedWeight updated by ECO or naively, whose states they support (see
        triton_adamw.supported and weight_supported; under 2^31 elements: int32 indices). False
        where they do not, Triton is not installed, or a kernel fails to compile or launch (then
        never again)."""
        maximize, weight_update = options
        module = kernels.triton_kernels()
        if module is None or param.numel() >= 2**31 or not param.grad.is_contiguous():
            return False
        m_format, v_format = formats["exp_avg"], formats["exp_avg_sq"]
        if isinstance(param, QuantizedWeight):
            if (weight_update not in ("eco", "naive")
                    or not module.weight_supported(param, m_format, v_format)):
                return False
            step = partial(module.adamw_weight_step, param, param.grad, state, formats, scalars,
                           seeds, weight_seed, weight_update == "eco", maximize)
        else:
            if not plain_float32(param) or not module.supported(m_format, v_format):
                return False
            step = partial(module.adamw_step, param, param.grad, state, formats, scalars, seeds, maximize)
        try:
            step()
        except Exception as error:  # compiling or launching it: before it wrote anything
            kernels.disable_triton(error)
            return False
        kernels.triton_steps += 1
        return True

    def _scalars(
        self, group: dict[str, Any], formats: dict[str, StateFormat], step: float, low_precision: bool
    ) -> dict[str, Any]:
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        beta1, beta2 = self.effective_beta1(group, formats["exp_avg"]), group["betas"][1]
        step_size, bias_correction2_sqrt = adam_step_scalars(lr, beta1, beta2, step)
        eco_scale = 0.0
        if group["weight_update"] == "eco" and lr > 0:
            eco_scale = (1 - beta1**step) / lr * (1 - 1 / beta1)
            eco_scale *= decay if group["eco_decay_correction"] else 1.0
        return dict(
            decay=decay, beta1=beta1, beta2=beta2, eps=group["eps"], step_size=step_size,
            bias_correction2_sqrt=bias_correction2_sqrt, eco_scale=eco_scale,
            # what the C kernel reproduces; float32 weights with 32-bit states: torch.optim's update
            reproducible=low_precision or any(f.quantized for f in formats.values()),
        )
