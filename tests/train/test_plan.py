"""Memory planning: the shape formula equals what memory_report measures, published shapes give
published parameter counts, and the per-parameter costs of the recipes are as documented."""

import pytest
import torch
from torch import nn

from slimtrain.train.models import GPT, GPT_SIZES, GPTConfig
from slimtrain.train.plan import (
    ARCHITECTURES,
    CATEGORIES,
    TensorSpec,
    architecture_specs,
    formula_check,
    gpt_tensor_specs,
    measured_memory,
    model_tensor_specs,
    parameter_count,
    plan_table,
    static_memory,
)
from slimtrain.train.recipes import RECIPES, Recipe

# tiny GPT: embedding 256x64, qkv 192x64, MLP 256x64 and 64x256 exceed min_quantized_numel (4096),
# proj 64x64 sits exactly at it, biases and norms stay below; widths are multiples of 32 (INT4)
TINY = GPT_SIZES["tiny"]

PUBLISHED = {  # Hugging Face safetensors parameter counts
    "llama-2-7b": 6_738_415_616,
    "llama-3-70b": 70_553_706_496,
    "gemma-3-1b": 999_885_952,
    "deepseek-moe-16b": 16_375_728_128,
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_formula_equals_measurement_per_category(recipe):
    formula = static_memory(gpt_tensor_specs(TINY), recipe)
    measured = measured_memory(recipe, TINY)
    assert set(formula) == set(CATEGORIES)
    assert formula == measured


def test_tiny_gpt_exercises_low_bit_states_and_quantized_weights():
    specs = gpt_tensor_specs(TINY)
    assert any(s.quantizable and s.numel > 4096 for s in specs)
    assert any(not s.quantizable and s.numel > 4096 for s in specs)  # the embedding
    assert all(s.shape[1] % 32 == 0 for s in specs if s.quantizable)
    slim, adamw = static_memory(specs, "slim"), static_memory(specs, "adamw")
    assert slim["parameters"] < adamw["parameters"] / 2
    assert slim["optimizer_state"] < adamw["optimizer_state"] / 4


def test_formula_check_over_every_recipe():
    config = GPTConfig(vocab_size=128, context=16, width=64, layers=1, heads=2)
    rows = formula_check(config)
    assert [name for name, _, _ in rows] == list(RECIPES)
    for name, formula, measured in rows:
        assert formula == measured, name


def test_model_specs_follow_named_parameters_and_quantize_weights():
    model = GPT(TINY)
    specs = model_tensor_specs(model)
    assert [(s.name, s.shape) for s in specs] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert "lm_head.weight" not in {s.name for s in specs}  # tied to the embedding: counted once
    converted = RECIPES["slim"].prepare_model(GPT(TINY))
    assert {s.name for s in specs if s.quantizable} == {f"{name}.weight" for name in converted}


def test_weight_tied_to_an_excluded_module_is_not_quantizable():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.out = nn.Linear(32, 64, bias=False)
            self.out.weight = self.embed.weight
            self.body = nn.Linear(32, 32)

    quantizable = {s.name: s.quantizable for s in model_tensor_specs(Tied())}
    assert quantizable == {"embed.weight": False, "body.weight": True, "body.bias": False}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    assert parameter_count(architecture_specs(name)) == PUBLISHED[name]


@pytest.mark.parametrize("size", list(GPT_SIZES))
def test_gpt_sizes_by_name(size):
    with torch.device("meta"):
        model = GPT(GPT_SIZES[size])
    assert parameter_count(ARCHITECTURES[f"gpt-{size}"]()) == sum(p.numel() for p in model.parameters())


def test_published_architectures_tie_and_quantize_as_published():
    names = {n: {s.name: s for s in architecture_specs(n)} for n in PUBLISHED}
    assert "lm_head.weight" not in names["gemma-3-1b"]
    for untied in ("llama-2-7b", "llama-3-70b", "deepseek-moe-16b"):
        assert not names[untied]["lm_head.weight"].quantizable
    for specs in names.values():
        assert not specs["model.embed_tokens.weight"].quantizable
        assert all(s.quantizable == (len(s.shape) == 2 and s.name.endswith("_proj.weight"))
                   for s in specs.values())
    routed = [s for s in names["deepseek-moe-16b"].values() if ".experts." in s.name]
    assert {s.count for s in routed} == {27 * 64} and {s.shape for s in routed} == {(1408, 2048),
                                                                                  (2048, 1408)}


def test_adamw_on_llama_2_7b_is_12_bytes_per_parameter():
    specs = architecture_specs("llama-2-7b")
    n, tensors = parameter_count(specs), sum(s.count for s in specs)
    memory = static_memory(specs, "adamw")
    assert memory == {"parameters": 4 * n, "master_weights": 0, "optimizer_state": 8 * n + 4 * tensors}
    assert sum(memory.values()) / n == pytest.approx(12.0, abs=1e-6)


def test_slim_is_at_most_a_seventh_of_bf16_master_on_llama_2_7b():
    specs = architecture_specs("llama-2-7b")
    slim = sum(static_memory(specs, "slim").values())
    bf16 = sum(static_memory(specs, "bf16-master").values())
    assert slim <= bf16 / 7


def test_group_width_must_divide_columns():
    specs = [TensorSpec("layer.weight", (64, 48), True)]
    with pytest.raises(ValueError, match="group_size"):
        static_memory(specs, "int4-eco")
    assert static_memory(specs, "slim")["parameters"] == 64 * 48 + 4 * 64  # FP8 codes + row scales


def test_plan_table_rows_and_reference():
    table = plan_table("gemma-3-1b", ["adamw", "slim"])
    lines = table.splitlines()
    assert "999,885,952" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"adamw", "slim"}
    assert rows["adamw"][-1] == "1.000" and float(rows["slim"][-1]) < 0.25
    assert len(plan_table("llama-2-7b").splitlines()) == 3 + len(RECIPES)


def test_unknown_architecture_names_accepted_values():
    with pytest.raises(ValueError, match="unknown architecture 'gpt-9'") as error:
        plan_table("gpt-9")
    for name in [*PUBLISHED, "gpt-tiny"]:
        assert name in str(error.value)


def test_a_recipe_with_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"method must be one of \('adamw', 'ddp'"):
        Recipe("mine", "a typo", method="lordoo")
