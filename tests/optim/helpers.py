import torch
from torch import nn


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 150), nn.Tanh(), nn.Linear(150, 7))


TEACHER = torch.randn(40, 7, generator=torch.Generator().manual_seed(1234))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable task: 7 classes given by a fixed random linear teacher, with 10% label noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(32, 40, generator=g)
        y = (x @ TEACHER).argmax(1)
        noisy = torch.rand(32, generator=g) < 0.1
        y = torch.where(noisy, torch.randint(0, 7, (32,), generator=g), y)
        out.append((x, y))
    return out


def train(model: nn.Module, optimizer, data, scheduler=None) -> list[float]:
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses




def differing(first: torch.Tensor, second: torch.Tensor, tolerance: float = 0.0) -> float:
    """Fraction of elements of two same-shaped tensors (any device, any dtype: compared as
    float32) that differ by more than ``tolerance``."""
    first, second = first.detach().cpu().float(), second.detach().cpu().float()
    return ((first - second).abs() > tolerance).float().mean().item()


def weight_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """What stores ``param``: its codes (as bytes) and scales for a QuantizedWeight, else itself."""
    if hasattr(param, "codes"):
        return [param.codes.view(torch.uint8), param.scales]
    return [param.detach()]


def assert_agree_to_rounding(first: tuple, second: tuple, share: float = 0.01,
                             tolerance: float = 1e-5) -> None:
    """Two (parameter, optimizer state) results agree up to rounding: fewer than ``share`` of the
    elements of the weight's storage and of each state tensor differ by more than ``tolerance``
    (codes flip only where a value lies at a level boundary)."""
    (param, state), (other_param, other_state) = first, second
    assert state.keys() == other_state.keys()
    pairs = [*zip(weight_tensors(param), weight_tensors(other_param), strict=True),
             *((state[key], other_state[key]) for key in state)]
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert differing(a, b, tolerance) < share, f"{differing(a, b, tolerance):.3%} differ"
