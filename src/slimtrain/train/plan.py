"""Memory planning: the bytes a recipe's model and ``st.AdamW`` hold, from tensor shapes alone.

:func:`static_memory` reproduces, from shapes, what :func:`slimtrain.memory_report` measures on
real tensors (weights, float32 master copies, optimizer states including each parameter's
``step``), by asking the optimizer for each state's format and :func:`layout` for its tensors.
:data:`ARCHITECTURES` holds the published shapes of a few open models and the GPT sizes of
:mod:`slimtrain.train.models`, so a plan can be printed for models too large to build.
Activations, gradients and temporaries are not counted: this is the static footprint.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimtrain.distributed import LoRDO
from slimtrain.optim import memory_report
from slimtrain.optim.state import StateFormat, layout
from slimtrain.quant.formats import weight_storage_bytes
from slimtrain.train.models import GPT, GPT_SIZES, GPTConfig
from slimtrain.train.recipes import RECIPES, Recipe, get_recipe
from slimtrain.weights.convert import default_linear_weights, excluded_by_default

CATEGORIES = ("parameters", "master_weights", "optimizer_state")
GIB = 2**30
_FLOAT32_BYTES = torch.float32.itemsize
_STEP = ((), torch.float32)  # the per-parameter ``step`` tensor of slimtrain's optimizers


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor: ``count`` identical copies (layers, experts) of ``shape``.

    quantizable: an nn.Linear weight that :func:`slimtrain.quantize_weights_` converts with its
    default exclusions (embeddings and output heads stay float32), shape (out, in).
    """

    name: str
    shape: tuple[int, ...]
    quantizable: bool
    count: int = 1

    @property
    def numel(self) -> int:
        """Elements of one copy."""
        return math.prod(self.shape)


def parameter_count(specs: list[TensorSpec]) -> int:
    """Total parameter elements of ``specs`` (copies included)."""
    return sum(s.numel * s.count for s in specs)


# ------------------------------------------------------------------------------ from a module
def model_tensor_specs(model: nn.Module) -> list[TensorSpec]:
    """The parameters of ``model`` (tied ones once, named as ``named_parameters()`` names them);
    quantizable ones are :func:`default_linear_weights`. Works on meta-device models."""
    quantizable = {id(p) for p in default_linear_weights(model)}
    return [TensorSpec(name, tuple(p.shape), id(p) in quantizable) for name, p in model.named_parameters()]


def gpt_tensor_specs(config: GPTConfig) -> list[TensorSpec]:
    """Specs of :class:`GPT` with ``config``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    return model_tensor_specs(model)


# ------------------------------------------------------------------- published architectures
def _linear(module: str, out_features: int, in_features: int, count: int = 1) -> TensorSpec:
    """The weight of an nn.Linear called ``module`` (no bias, as in these models)."""
    return TensorSpec(f"{module}.weight", (out_features, in_features), not excluded_by_default(module), count)


def _vector(name: str, size: int, count: int = 1) -> TensorSpec:
    """A 1-D float32 parameter (an RMSNorm weight, a bias)."""
    return TensorSpec(name, (size,), False, count)


def _mlp(prefix: str, hidden: int, intermediate: int, count: int) -> list[TensorSpec]:
    """A gated MLP: gate_proj and up_proj (hidden -> intermediate), down_proj (back)."""
    return [
        _linear(f"{prefix}.gate_proj", intermediate, hidden, count),
        _linear(f"{prefix}.up_proj", intermediate, hidden, count),
        _linear(f"{prefix}.down_proj", hidden, intermediate, count),
    ]


def _attention(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int, count: int,
               qk_norm: bool = False) -> list[TensorSpec]:
    """q/k/v/o projections (grouped-query attention), optionally RMSNorms of q and k per head."""
    specs = [
        _linear(f"{prefix}.q_proj", heads * head_dim, hidden, count),
        _linear(f"{prefix}.k_proj", kv_heads * head_dim, hidden, count),
        _linear(f"{prefix}.v_proj", kv_heads * head_dim, hidden, count),
        _linear(f"{prefix}.o_proj", hidden, heads * head_dim, count),
    ]
    if qk_norm:
        specs += [_vector(f"{prefix}.q_norm.weight", head_dim, count),
                  _vector(f"{prefix}.k_norm.weight", head_dim, count)]
    return specs


def _ends(vocab: int, hidden: int, tied: bool) -> list[TensorSpec]:
    """Token embedding, final RMSNorm and (untied) output head."""
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), False),
             _vector("model.norm.weight", hidden)]
    return specs if tied else [*specs, _linear("lm_head", vocab, hidden)]


def llama_specs(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                head_dim: int | None = None, tied: bool = False) -> list[TensorSpec]:
    """A Llama decoder: per layer attention, gated MLP, two RMSNorms."""
    head_dim = head_dim or hidden // heads
    prefix = "model.layers.*"
    return [
        *_ends(vocab, hidden, tied),
        *_attention(f"{prefix}.self_attn", hidden, heads, kv_heads, head_dim, layers),
        *_mlp(f"{prefix}.mlp", hidden, intermediate, layers),
        _vector(f"{prefix}.input_layernorm.weight", hidden, layers),
        _vector(f"{prefix}.post_attention_layernorm.weight", hidden, layers),
    ]


def gemma3_specs(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int) -> list[TensorSpec]:
    """A Gemma 3 decoder: tied embedding, q/k RMSNorms, four RMSNorms per layer."""
    prefix = "model.layers.*"
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    return [
        *_ends(vocab, hidden, tied=True),
        *_attention(f"{prefix}.self_attn", hidden, heads, kv_heads, head_dim, layers, qk_norm=True),
        *_mlp(f"{prefix}.mlp", hidden, intermediate, layers),
        *(_vector(f"{prefix}.{norm}.weight", hidden, layers) for norm in norms),
    ]


def deepseek_moe_specs(vocab: int, hidden: int, layers: int, heads: int, intermediate: int,
                       moe_intermediate: int, routed: int, shared: int, dense_layers: int
                       ) -> list[TensorSpec]:
    """A DeepSeekMoE decoder: ``dense_layers`` dense MLP layers, then MoE layers of ``routed``
    experts, ``shared`` always-active experts (one MLP ``shared`` times wider, as published) and
    a router (a plain parameter, not an nn.Linear: it stays float32). Untied head."""
    moe_layers = layers - dense_layers
    head_dim = hidden // heads
    every, dense, moe = "model.layers.*", "model.layers.dense", "model.layers.moe"
    return [
        *_ends(vocab, hidden, tied=False),
        *_attention(f"{every}.self_attn", hidden, heads, heads, head_dim, layers),
        _vector(f"{every}.input_layernorm.weight", hidden, layers),
        _vector(f"{every}.post_attention_layernorm.weight", hidden, layers),
        *_mlp(f"{dense}.mlp", hidden, intermediate, dense_layers),
        TensorSpec(f"{moe}.mlp.gate.weight", (routed, hidden), False, moe_layers),
        *_mlp(f"{moe}.mlp.experts.*", hidden, moe_intermediate, moe_layers * routed),
        *_mlp(f"{moe}.mlp.shared_experts", hidden, moe_intermediate * shared, moe_layers),
    ]


ARCHITECTURES: dict[str, Callable[[], list[TensorSpec]]] = {
    # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters
    "llama-2-7b": functools.partial(llama_specs, vocab=32000, hidden=4096, layers=32, heads=32,
                                    kv_heads=32, intermediate=11008),
    # meta-llama/Meta-Llama-3-70B: 70,553,706,496 parameters
    "llama-3-70b": functools.partial(llama_specs, vocab=128256, hidden=8192, layers=80, heads=64,
                                     kv_heads=8, intermediate=28672),
    # google/gemma-3-1b-pt: 999,885,952 parameters
    "gemma-3-1b": functools.partial(gemma3_specs, vocab=262144, hidden=1152, layers=26, heads=4,
                                    kv_heads=1, head_dim=256, intermediate=6912),
    # deepseek-ai/deepseek-moe-16b-base: 16,375,728,128 parameters
    "deepseek-moe-16b": functools.partial(
        deepseek_moe_specs, vocab=102400, hidden=2048, layers=28, heads=16, intermediate=10944,
        moe_intermediate=1408, routed=64, shared=2, dense_layers=1),
    **{f"gpt-{size}": functools.partial(gpt_tensor_specs, config) for size, config in GPT_SIZES.items()},
}


def architecture_specs(name: str) -> list[TensorSpec]:
    """The specs of architecture ``name``; ValueError naming the accepted names otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; accepted: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]()


# ------------------------------------------------------------------------------- the formula
def _as_recipe(recipe: Recipe | str) -> Recipe:
    return get_recipe(recipe) if isinstance(recipe, str) else recipe


def _layout_bytes(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in tensors.values())


def _low_rank_state_bytes(spec: TensorSpec, recipe: Recipe, block_size: int, weight_bytes: int) -> int:
    """Optimizer state bytes of one tensor under the "lowrank-ddp", "diloco" or "lordo" methods
    (their step counters are Python ints). Matrix weights: Q (n, r) float32, moments (r, m) in the
    recipe's state bits; LoRDO adds E (n, m); the round methods keep an anchor of every tensor
    (float32, or ``weight_bytes`` in the weight's own storage with anchor="eco") and, with outer
    momentum, a buffer; everything else keeps float32 AdamW moments."""
    numel = spec.numel
    eco_anchor = dict(recipe.lordo_options).get("anchor") == "eco" and weight_bytes < numel * _FLOAT32_BYTES
    anchor = (weight_bytes if eco_anchor else numel * _FLOAT32_BYTES) if recipe.method in (
        "diloco", "lordo") else 0
    if recipe.method == "diloco":
        return anchor + 3 * numel * _FLOAT32_BYTES  # AdamW m, v and the outer Nesterov buffer
    if recipe.method == "lordo":
        momentum = dict(recipe.lordo_options).get(
            "outer_momentum", inspect.signature(LoRDO).parameters["outer_momentum"].default)
        anchor += numel * _FLOAT32_BYTES if momentum > 0 else 0  # the outer Nesterov buffer
    n, m = sorted(spec.shape) if len(spec.shape) == 2 else (0, 0)
    if not (spec.quantizable and n > recipe.rank):
        return anchor + 2 * numel * _FLOAT32_BYTES
    bits = recipe.state_bits if recipe.method == "lordo" else (32, 32)
    moments = sum(
        _layout_bytes(layout(StateFormat(b, signed=signed, kind=kind, block_size=block_size), name,
                             torch.Size((recipe.rank, m))))
        for name, b, signed, kind in (("u", bits[0], True, "dynamic"), ("v", bits[1], False, "log"))
    )
    error = numel * _FLOAT32_BYTES if recipe.method == "lordo" and dict(recipe.lordo_options).get(
        "error_feedback", True) else 0
    return anchor + error + n * recipe.rank * _FLOAT32_BYTES + moments


def static_memory(specs: list[TensorSpec], recipe: Recipe | str, block_size: int = 128,
                  quantile: float = 0.1, min_quantized_numel: int = 4096) -> dict[str, int]:
    """Bytes by category ("parameters", "master_weights", "optimizer_state") that the model of
    ``specs``, prepared by ``recipe``, and ``recipe.make_optimizer`` (with these options) hold once
    every parameter has taken a step: what :func:`slimtrain.memory_report` measures.

    Quantizable specs take the recipe's weight format (:func:`weight_storage_bytes`); the others
    stay float32. The state formats come from the optimizer itself, their tensors from
    :func:`layout`. Raises ValueError, as ``quantize_weights_`` does, for a group width that
    does not divide a quantizable weight's columns.
    """
    recipe = _as_recipe(recipe)
    fmt = recipe.weight_format
    granularity = "tensor" if fmt == "bf16" else recipe.granularity
    if recipe.method in ("adamw", "ddp"):
        optimizer = recipe.make_optimizer([torch.zeros(1)], lr=1e-3, compile=False, block_size=block_size,
                                          quantile=quantile, min_quantized_numel=min_quantized_numel)
        group = optimizer.param_groups[0]
    totals = dict.fromkeys(CATEGORIES, 0)
    for spec in specs:
        quantized = spec.quantizable and fmt is not None
        if quantized:
            rows, cols = spec.shape
            if granularity == "group" and cols % recipe.group_size:
                raise ValueError(f"{spec.name}: in_features {cols} is not a multiple of group_size "
                                 f"{recipe.group_size}")
            weight = weight_storage_bytes(fmt, granularity, recipe.group_size, rows, cols)
        else:
            weight = spec.numel * _FLOAT32_BYTES
        master, states = 0, _layout_bytes({"step": _STEP})
        if recipe.method not in ("adamw", "ddp"):
            states = _low_rank_state_bytes(spec, recipe, block_size, weight)
        else:
            # a stand-in on the meta device: bfloat16 marks "stored below float32" to the optimizer
            stand_in = torch.empty(spec.shape, device="meta", dtype=torch.bfloat16 if quantized else None)
            for name, state_format in optimizer.state_formats(group, stand_in).items():
                size = _layout_bytes(layout(state_format, name, torch.Size(spec.shape)))
                if name == "master":
                    master += size
                else:
                    states += size
        totals["parameters"] += weight * spec.count
        totals["master_weights"] += master * spec.count
        totals["optimizer_state"] += states * spec.count
    return totals


def measured_memory(recipe: Recipe | str, config: GPTConfig, seed: int = 0) -> dict[str, int]:
    """Bytes by category that :func:`slimtrain.memory_report` measures on a real :class:`GPT`
    with ``config``, prepared by ``recipe``, after steps of ``recipe.make_optimizer`` on random
    tokens: one, or one round for the round methods (so that every state exists)."""
    recipe = _as_recipe(recipe)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global generator untouched
        torch.manual_seed(seed)
        model = GPT(config)
    recipe.prepare_model(model)
    optimizer = recipe.make_optimizer(model, lr=1e-3, compile=False, seed=seed)
    tokens = torch.randint(0, config.vocab_size, (2, min(config.context, 16) + 1), generator=generator)
    for _ in range(recipe.sync_every if recipe.method in ("diloco", "lordo") else 1):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
    return memory_report(model, optimizer).categories


def formula_check(config: GPTConfig) -> list[tuple[str, int, int]]:
    """(recipe name, bytes by :func:`static_memory`, bytes measured) over every recipe, totals
    of all categories, for a :class:`GPT` with ``config``."""
    specs = gpt_tensor_specs(config)
    return [
        (name, sum(static_memory(specs, recipe).values()),
         sum(measured_memory(recipe, config).values()))
        for name, recipe in RECIPES.items()
    ]


# --------------------------------------------------------------------------------- the table
def plan_table(architecture: str, recipes: list[str] | None = None) -> str:
    """A plain-text table of the static memory of ``architecture`` under each recipe (every
    recipe when None): weights, master copies, optimizer states and total in GiB (2^30 bytes; MiB
    for models whose adamw total is under 1 GiB), bytes per parameter, and the total's ratio to
    the ``adamw`` recipe."""
    specs = architecture_specs(architecture)
    names = list(RECIPES) if recipes is None else list(recipes)
    count = parameter_count(specs)
    reference = sum(static_memory(specs, "adamw").values())
    unit, size = ("GiB", GIB) if reference >= GIB else ("MiB", 2**20)
    header = (f"{'recipe':<16}{'weights ' + unit:>13}{'master ' + unit:>12}{'states ' + unit:>12}"
              f"{'total ' + unit:>12}{'bytes/param':>13}{'vs adamw':>10}")
    lines = [f"{architecture}: {count:,} parameters; static memory, no activations or gradients",
             header, "-" * len(header)]
    for name in names:
        memory = static_memory(specs, name)
        total = sum(memory.values())
        lines.append(
            f"{name:<16}{memory['parameters'] / size:>13.2f}{memory['master_weights'] / size:>12.2f}"
            f"{memory['optimizer_state'] / size:>12.2f}{total / size:>12.2f}{total / count:>13.3f}"
            f"{total / reference:>10.3f}"
        )
    return "\n".join(lines)


def recipes_table(architectures: tuple[str, ...] = ("gpt-small", "llama-2-7b")) -> str:
    """Every recipe with its description and static bytes per parameter on ``architectures``."""
    specs = {name: architecture_specs(name) for name in architectures}
    columns = "".join(f"{name + ' B/param':>22}" for name in architectures)
    header = f"{'recipe':<16}{columns}  description"
    lines = [header, "-" * len(header)]
    for name, recipe in RECIPES.items():
        per_param = "".join(f"{sum(static_memory(s, recipe).values()) / parameter_count(s):>22.3f}"
                            for s in specs.values())
        lines.append(f"{name:<16}{per_param}  {recipe.description}")
    return "\n".join(lines)
