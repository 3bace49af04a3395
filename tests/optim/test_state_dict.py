"""Checkpoints: save, load with weights_only=True into a fresh optimizer, continue identically."""

import copy
import io

import pytest
import torch

import slimtrain as st

from .helpers import batches, make_model, train

CONFIGS = [
    dict(state_bits=32),
    dict(state_bits=(4, 2)),
    dict(state_bits=(3, 2), state_rounding="stochastic"),
    dict(state_bits=(8, 8), state_maps=("linear", "dynamic")),
    dict(state_bits=16),
]


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_exactly(config, dtype):
    data = batches(16)
    model = make_model().to(dtype)
    opt = st.AdamW(model.parameters(), lr=3e-3, min_quantized_numel=0, seed=3, **config)
    train(model, opt, [(x.to(dtype), y) for x, y in data[:8]])
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    train(model, opt, [(x.to(dtype), y) for x, y in data[8:]])

    resumed = make_model(seed=9).to(dtype)
    resumed.load_state_dict(saved_model)
    opt2 = st.AdamW(resumed.parameters(), lr=3e-3, min_quantized_numel=0, seed=99, **config)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, [(x.to(dtype), y) for x, y in data[8:]])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_codes_and_scales_keep_their_dtype_with_bf16_params():
    model = make_model().to(torch.bfloat16)
    opt = st.AdamW(model.parameters(), state_bits=(4, 2), min_quantized_numel=0)
    train(model, opt, [(x.bfloat16(), y) for x, y in batches(2)])
    fresh = st.AdamW(model.parameters(), state_bits=(4, 2), min_quantized_numel=0)
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert fresh.state[p][key].dtype == value.dtype
            assert torch.equal(fresh.state[p][key], value)
    assert fresh.state[model[0].weight]["exp_avg_scales"].dtype == torch.float32


def test_sgd_resume_continues_exactly():
    data = batches(10)
    model = make_model()
    opt = st.SGD(model.parameters(), lr=0.05, momentum=0.9, state_bits=4,
                 state_rounding="stochastic", min_quantized_numel=0)
    train(model, opt, data[:5])
    saved = roundtrip((model.state_dict(), opt.state_dict()))
    train(model, opt, data[5:])
    other = make_model(seed=4)
    other.load_state_dict(saved[0])
    opt2 = st.SGD(other.parameters(), lr=0.05, momentum=0.9, state_bits=4,
                  state_rounding="stochastic", min_quantized_numel=0)
    opt2.load_state_dict(saved[1])
    train(other, opt2, data[5:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))


def saved_and_other(other_bits: tuple[int, int]) -> tuple:
    """(model, a roundtripped state_dict of (4, 2) states after two batches, another optimizer
    with ``other_bits`` after one batch, a copy of its state_dict)."""
    model = make_model()
    opt = st.AdamW(model.parameters(), state_bits=(4, 2), min_quantized_numel=0)
    train(model, opt, batches(2))
    saved = roundtrip(opt.state_dict())
    other = st.AdamW(model.parameters(), state_bits=other_bits, min_quantized_numel=0)
    train(model, other, batches(1))
    return model, saved, other, copy.deepcopy(other.state_dict())


def assert_untouched(optimizer, before: dict) -> None:
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["rng_state"], before["rng_state"])
    for index, values in before["state"].items():
        for key, value in values.items():
            assert torch.equal(after["state"][index][key], value)


def test_mismatched_configuration_is_refused_untouched():
    model, saved, other, before = saved_and_other((8, 8))
    with pytest.raises(ValueError, match="state_bits"):
        other.load_state_dict(saved)
    assert_untouched(other, before)
    with pytest.raises(ValueError, match="slimtrain"):
        other.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_a_bad_generator_state_or_index_is_refused_untouched():
    _, saved, other, before = saved_and_other((4, 2))
    for bad in (saved["rng_state"][:10], saved["rng_state"].float()):
        with pytest.raises(ValueError, match="rng_state"):
            other.load_state_dict({**saved, "rng_state": bad})
    with pytest.raises(ValueError, match="parameter 99"):
        other.load_state_dict({**saved, "state": {**saved["state"], 99: saved["state"][0]}})
    assert_untouched(other, before)


def test_state_of_a_different_model_is_refused():
    model = make_model()
    opt = st.AdamW(model.parameters(), state_bits=(4, 2), min_quantized_numel=0)
    train(model, opt, batches(1))
    bigger = torch.nn.Sequential(torch.nn.Linear(40, 160), torch.nn.Tanh(), torch.nn.Linear(160, 7))
    with pytest.raises(ValueError, match="does not match"):
        st.AdamW(bigger.parameters(), state_bits=(4, 2), min_quantized_numel=0).load_state_dict(
            roundtrip(opt.state_dict())
        )


def test_deepcopy_and_add_param_group():
    model = make_model()
    opt = st.AdamW(list(model[0].parameters()), lr=1e-2, state_bits=(4, 2), min_quantized_numel=0)
    opt.add_param_group({"params": list(model[2].parameters()), "state_bits": 8})
    assert opt.param_groups[1]["state_bits"] == (8, 8)
    train(model, opt, batches(2))
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # an independent copy: its own parameters and states, the same next step (generator included)
    pairs = list(zip((p for g in opt.param_groups for p in g["params"]),
                     (p for g in clone.param_groups for p in g["params"]), strict=True))
    before = copy.deepcopy(opt.state_dict())
    generator = torch.Generator().manual_seed(5)
    for param, copied in pairs:
        assert copied is not param and torch.equal(copied, param)
        param.grad = torch.randn(param.shape, generator=generator)
        copied.grad = param.grad.clone()
    clone.step()
    for index, values in before["state"].items():
        assert all(torch.equal(opt.state_dict()["state"][index][k], v) for k, v in values.items())
    opt.step()
    assert all(torch.equal(copied, param) for param, copied in pairs)
    group = {"params": (torch.nn.Parameter(torch.zeros(3)),), "state_bits": 5}
    with pytest.raises(ValueError, match="state_bits"):
        opt.add_param_group(group)
    assert set(group) == {"params", "state_bits"} and isinstance(group["params"], tuple)  # as it was
