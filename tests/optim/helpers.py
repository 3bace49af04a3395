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


