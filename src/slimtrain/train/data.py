"""Text corpora available offline, as byte tensors."""

from __future__ import annotations

import torch


def python_docs_text() -> str:
    """English reference documentation that ships with CPython (``pydoc_data.topics``), ~465 kB."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``(len,)`` int64 tensor of token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the first ``1 - val_fraction`` for training, the rest for validation."""
    cut = int(tokens.numel() * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def random_windows(
    tokens: torch.Tensor, batch_size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs and next-token targets, each ``(batch, length)``."""
    starts = torch.randint(0, tokens.numel() - length - 1, (batch_size,), generator=generator)
    offsets = torch.arange(length + 1)
    windows = tokens[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]
