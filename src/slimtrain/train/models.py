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


def rotary_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotary position embeddings (RoPE), each (length, head_dim / 2) float32."""
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * frequencies
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x`` (batch, heads, length, head_dim): rotate pairs (first half, second half)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, length, head_dim)
        y = nn.functional.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v,
                                                       is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.width)
        hidden = config.mlp_ratio * config.width
        self.mlp = nn.Sequential(nn.Linear(config.width, hidden, bias=False), nn.GELU(),
                                 nn.Linear(hidden, config.width, bias=False))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer in the LLaMA manner (pre-norm RMSNorm, rotary positions, no
    biases) with a GELU MLP and the output head tied to the token embedding.
    ``idx`` (batch, length ≤ context) int64 -> logits (batch, length, vocab) float32."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.width % (2 * config.heads):
            raise ValueError(f"width {config.width} is not a multiple of 2 * heads ({config.heads})")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        cos, sin = rotary_tables(config.context, config.width // config.heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.width)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.config.context:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.config.context}")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x)).float()
