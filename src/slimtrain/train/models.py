"""Small models for demonstrations and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a decoder-only transformer: vocabulary, context length (tokens), width, depth,
    attention heads; the MLP is ``mlp_ratio`` times wider than the model."""

    vocab_size: int = 256
    context: int = 128
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4


GPT_SIZES = {
    "tiny": GPTConfig(context=64, width=64, layers=2, heads=2),
    "small": GPTConfig(context=128, width=192, layers=4, heads=4),
    "medium": GPTConfig(context=256, width=384, layers=6, heads=6),
    "large": GPTConfig(context=1024, width=768, layers=12, heads=12),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        y = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.width)
        hidden = config.mlp_ratio * config.width
        self.mlp = nn.Sequential(nn.Linear(config.width, hidden), nn.GELU(), nn.Linear(hidden, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer (pre-norm, learned positions, output head tied to the token
    embedding). ``idx`` (batch, length ≤ context) int64 -> logits (batch, length, vocab) float32."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not a multiple of heads {config.heads}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.pos_embed = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.embed(idx) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x)).float()
