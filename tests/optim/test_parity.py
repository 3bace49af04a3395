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
def test_adamw_matches_torch_bitwise(weight_decay, maximize):
    ref, ours = make_model(), make_model()
    kwargs = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=weight_decay,
                  maximize=maximize)
    opt_ref = torch.optim.AdamW(groups(ref, lr=1e-3, weight_decay=0.02), **kwargs)
    opt_ours = st.AdamW(groups(ours, lr=1e-3, weight_decay=0.02), **kwargs)
    sched_ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt_ref, 30)
    sched_ours = torch.optim.lr_scheduler.CosineAnnealingLR(opt_ours, 30)
    data = batches(30)
    assert train(ref, opt_ref, data, sched_ref) == train(ours, opt_ours, data, sched_ours)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw_close_to_torch_fused():
    ref, ours = make_model(), make_model()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    opt_ours = st.AdamW(ours.parameters(), lr=1e-3)
    data = batches(20)
    train(ref, opt_ref, data)
    train(ours, opt_ours, data)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
     dict(momentum=0.5, dampening=0.3, weight_decay=1e-2), dict(momentum=0.0)],
)
def test_sgd_matches_torch_bitwise(kwargs):
    ref, ours = make_model(), make_model()
    opt_ref = torch.optim.SGD(groups(ref, lr=0.02), lr=0.05, **kwargs)
    opt_ours = st.SGD(groups(ours, lr=0.02), lr=0.05, **kwargs)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, 10, 0.5)
    sched_ours = torch.optim.lr_scheduler.StepLR(opt_ours, 10, 0.5)
    data = batches(30)
    assert train(ref, opt_ref, data, sched_ref) == train(ours, opt_ours, data, sched_ours)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


def test_closure_zero_grad_and_skipped_params():
    model = make_model()
    frozen = model[0].bias
    before = frozen.detach().clone()
    opt = st.AdamW(model.parameters(), lr=1e-2, state_bits=(4, 2), min_quantized_numel=0)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        frozen.grad = None
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert torch.equal(frozen, before) and frozen not in opt.state
