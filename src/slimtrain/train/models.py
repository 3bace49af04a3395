"""Small models for demonstrations and benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class ByteMLP(nn.Module):
    """A small byte-level language model: the previous ``context`` bytes -> next-byte logits."""

    def __init__(self, context: int = 16, width: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.body = nn.Sequential(
            nn.Linear(32 * context, width), nn.GELU(), nn.Linear(width, width), nn.GELU()
        )
        self.head = nn.Linear(width, 256)
        self.context = context

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (batch, context) int64 -> logits (batch, 256)."""
        return self.head(self.body(self.embed(idx).flatten(1)))
