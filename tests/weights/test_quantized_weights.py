"""Quantized weights: real storage, an unchanged training loop, round trips, clear errors."""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import slimtrain as st
from slimtrain.quant.formats import WEIGHT_FORMATS, dequantize_weight, format_max, quantize_weight
from slimtrain.train.models import GPT, GPT_SIZES


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.block = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 50)

    def forward(self, idx):
        return self.head(self.norm(self.block(self.embed(idx))))


@pytest.mark.parametrize("fmt,limit", [("fp8_e4m3", 1.01), ("fp8_e5m2", 1.01), ("int8", 1.01),
                                       ("int4", 0.52), ("bf16", 2.0)])
def test_storage_bytes_per_parameter(fmt, limit):
    layer = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    st.quantize_weights_(layer, fmt)
    assert st.memory_report(layer).per_parameter() <= limit


@settings(max_examples=60, deadline=None)
@given(fmt=hst.sampled_from(WEIGHT_FORMATS), rows=hst.integers(1, 8), data=hst.data())
def test_weight_quantizers_round_trip_within_a_level(fmt, rows, data):
    values = data.draw(hst.lists(hst.floats(-1e4, 1e4, width=32), min_size=rows * 64,
                                 max_size=rows * 64))
    w = torch.tensor(values).view(rows, 64)
    for granularity in ("row", "tensor"):
        for seed in (None, 7):
            codes, scales = quantize_weight(w, fmt, granularity, seed=seed)
            back = dequantize_weight(codes, scales, fmt, w.shape, granularity)
            assert torch.isfinite(back).all()
            scale = (w.abs().amax(1, keepdim=True) if granularity == "row" else w.abs().amax())
            if fmt == "bf16":
                bound = w.abs() * 2**-7 * (2 if seed is not None else 1) + 1e-38
            elif fmt.startswith("fp8"):
                mantissa = 3 if fmt == "fp8_e4m3" else 2
                bound = (w.abs() * 2.0**-mantissa + scale / format_max(fmt) * 2**-6) * (
                    2 if seed is not None else 1)
            else:
                bound = scale / format_max(fmt) * (1 if seed is not None else 0.5)
            assert torch.all((back - w).abs() <= bound * 1.001 + 1e-30)


def test_conversion_defaults_and_unchanged_loop():
    torch.manual_seed(0)
    model = Tiny()
    converted = st.quantize_weights_(model, "fp8_e4m3")
    assert converted == ["block.0", "block.2"]
    assert model.block[0].weight.codes.dtype == torch.float8_e4m3fn
    assert model.block[0].weight.codes.element_size() == 1
    assert not isinstance(model.head.weight, st.QuantizedWeight)
    assert model.block[0].bias.dtype == torch.float32
    idx = torch.randint(0, 50, (4, 9))
    loss = model(idx).logsumexp(-1).mean()
    loss.backward()
    assert model.block[0].weight.grad.dtype == torch.float32
    assert model.block[0].weight.grad.shape == (128, 64)
    assert torch.isfinite(model.block[0].weight.grad).all()


def test_state_dict_deepcopy_and_to_round_trip():
    torch.manual_seed(0)
    model = Tiny()
    st.quantize_weights_(model, "int4", granularity="group", group_size=64)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = Tiny()
    st.quantize_weights_(other, "int4", granularity="group", group_size=64)
    other.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 5))
    assert torch.equal(model(idx), other(idx))
    clone = copy.deepcopy(model).to("cpu")
    assert torch.equal(clone(idx), model(idx))
    assert clone.block[0].weight.codes.data_ptr() != model.block[0].weight.codes.data_ptr()


@pytest.mark.parametrize("variant", [{}, {"foreach": True}, {"fused": True}], ids=str)
def test_other_optimizers_get_a_clear_error(variant):
    """torch's single-tensor, foreach and fused steps alike (the last two take lists of tensors)
    are refused before a weight is written, never applied to a decoded copy and lost."""
    model = Tiny()
    st.quantize_weights_(model, "fp8_e4m3")
    before = copy.deepcopy(model.state_dict())
    model(torch.randint(0, 50, (2, 3))).sum().backward()
    with pytest.raises(TypeError, match="slimtrain's optimizers"):
        torch.optim.AdamW(model.parameters(), **variant).step()
    after = model.state_dict()
    quantized = [key for key, value in before.items() if isinstance(value, st.QuantizedWeight)]
    assert quantized and all(torch.equal(after[key].codes, before[key].codes) for key in quantized)


def test_a_quantized_weight_may_be_read_into_a_plain_tensor():
    weight = st.QuantizedWeight.from_float(torch.randn(4, 32), st.WeightFormat("fp8_e4m3", "row"))
    plain = torch.zeros(4, 32)
    plain.copy_(weight)
    assert torch.equal(plain, weight.dequantize())


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(fmt="fp4"), "fmt must be one of"), (dict(granularity="column"), "granularity"),
     (dict(fmt="int4", granularity="group", group_size=48), "group_size"),
     (dict(include=("attention",)), "matches no nn.Linear"), (dict(exclude=("nope",)), "nope")],
)
def test_bad_conversion_arguments(kwargs, match):
    model = Tiny()
    with pytest.raises(ValueError, match=match):
        st.quantize_weights_(model, **kwargs)
    assert not any(isinstance(p, st.QuantizedWeight) for p in model.parameters())


def test_exclude_patterns_may_name_modules_other_than_linears():
    """DESIGN's example: "norm" and "embed" name no nn.Linear of the GPT, but modules of it."""
    model = GPT(GPT_SIZES["tiny"])
    converted = st.quantize_weights_(model, exclude=("embed", "head", "norm"))
    assert converted and not any("norm" in name or "head" in name for name in converted)
    assert converted == st.quantize_weights_(GPT(GPT_SIZES["tiny"]))


def test_a_layer_narrower_than_whole_groups_is_refused_before_any_conversion():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    with pytest.raises(ValueError, match="2: in_features 48 is not a multiple of group_size 32"):
        st.quantize_weights_(model, "int4", "group", 32, exclude=())
    assert not any(isinstance(p, st.QuantizedWeight) for p in model.parameters())
