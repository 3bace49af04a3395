"""With 32-bit states slimtrain's optimizers are torch.optim's, bit for bit."""

import pytest
import torch

import slimtrain as st

from .helpers import batches, make_model, train


def groups(model, **second):
    first, last = list(model[0].parameters()), list(model[2].parameters())
    return [{"params": first}, {"params": last, **second}]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("compile", [True, False])
def test_adamw_matches_torch_bitwise(weight_decay, maximize, compile):
    """compile=True runs torch's fused kernel (fused=True's bits), compile=False the
    single-tensor path (the default's bits)."""
    ref, ours = make_model(), make_model()
    kwargs = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=weight_decay,
                  maximize=maximize)
    opt_ref = torch.optim.AdamW(groups(ref, lr=1e-3, weight_decay=0.02), fused=compile, **kwargs)
    opt_ours = st.AdamW(groups(ours, lr=1e-3, weight_decay=0.02), compile=compile, **kwargs)
    sched_ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt_ref, 30)
    sched_ours = torch.optim.lr_scheduler.CosineAnnealingLR(opt_ours, 30)
    data = batches(30)
    assert train(ref, opt_ref, data, sched_ref) == train(ours, opt_ours, data, sched_ours)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_and_single_tensor_paths_differ_only_by_rounding():
    """The two torch paths st.AdamW follows give different bits, not different training."""
    fused, single = make_model(), make_model()
    data = batches(20)
    train(fused, st.AdamW(fused.parameters(), lr=1e-3), data)
    train(single, st.AdamW(single.parameters(), lr=1e-3, compile=False), data)
    for a, b in zip(fused.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
     dict(momentum=0.5, dampening=0.3, weight_decay=1e-2), dict(momentum=0.0)],
)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("compile", [True, False])
def test_sgd_matches_torch_bitwise(kwargs, maximize, compile):
    """compile=True runs torch's fused kernel (fused=True's bits), compile=False the
    single-tensor path (the default's bits)."""
    ref, ours = make_model(), make_model()
    opt_ref = torch.optim.SGD(groups(ref, lr=0.02), lr=0.05, fused=compile, maximize=maximize, **kwargs)
    opt_ours = st.SGD(groups(ours, lr=0.02), lr=0.05, compile=compile, maximize=maximize, **kwargs)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, 10, 0.5)
    sched_ours = torch.optim.lr_scheduler.StepLR(opt_ours, 10, 0.5)
    data = batches(30)
    assert train(ref, opt_ref, data, sched_ref) == train(ours, opt_ours, data, sched_ours)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


def test_closure_zero_grad_and_skipped_params():
    model = make_model()
    frozen = model[0].bias
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = st.AdamW(model.parameters(), lr=1e-2, state_bits=(4, 2), min_quantized_numel=0)
    x, y = batches(1)[0]
    returned = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        frozen.grad = None
        returned.append(loss)
        return loss

    loss = opt.step(closure)
    assert len(returned) == 1 and loss is returned[0]  # called once, its loss returned
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (p is frozen), name  # all others took a step
    assert frozen not in opt.state and len(opt.state) == len(before) - 1
