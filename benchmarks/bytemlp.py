"""Shared benchmark workload: ByteMLP on CPython's bundled docs (real English text, offline).

``train_bytemlp`` trains one setting with a fixed seed and data order and returns the final
validation loss (2048 held-out windows) and the measured memory report.
"""

from __future__ import annotations

import torch
from torch import nn

import slimtrain as st
from slimtrain.train.data import byte_tokens, python_docs_text, random_windows, split_tokens
from slimtrain.train.models import ByteMLP

TOKENS, VAL_TOKENS = split_tokens(byte_tokens(python_docs_text()))


def train_bytemlp(optimizer: dict, steps: int, seed: int = 0, weights: dict | None = None,
                  lr: float = 2e-3) -> tuple[float, st.MemoryReport]:
    """Train with ``st.AdamW(**optimizer)``; ``weights`` are quantize_weights_ arguments (the two
    hidden Linear layers; embedding and head stay float32) or a dtype under key "dtype"."""
    torch.manual_seed(seed)
    model = ByteMLP()
    weights = dict(weights or {})
    if "dtype" in weights:
        dtype = weights.pop("dtype")
        model.body.to(dtype)  # bf16 activations inside the body, float32 around it
        model.body.register_forward_pre_hook(lambda _, args: (args[0].to(dtype),))
        model.body.register_forward_hook(lambda _, args, out: out.float())
    if weights:
        st.quantize_weights_(model, include=("body",), exclude=(), **weights)
    opt = st.AdamW(model.parameters(), lr=lr, weight_decay=0.0, seed=seed, **optimizer)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = random_windows(TOKENS, 64, model.context, rng)
        loss = nn.functional.cross_entropy(model(x).float(), y[:, -1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, y = random_windows(VAL_TOKENS, 2048, model.context, torch.Generator().manual_seed(1))
        val = nn.functional.cross_entropy(model(x).float(), y[:, -1]).item()
    return val, st.memory_report(model, opt)
