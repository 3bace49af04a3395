"""Shared benchmark workload: ByteMLP on CPython's bundled docs (real English text, offline).

``train_bytemlp`` trains one setting with a fixed seed and data order and returns the final
validation loss (2048 held-out windows) and the measured memory report.
"""

from __future__ import annotations

import argparse
import json

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


def run_table(description: str, settings: dict[str, tuple[dict, dict | None]],
              bytes_category: str | None) -> None:
    """Command line of a results table: train every setting (name -> (optimizer kwargs, weight
    setup)), print validation loss, its gap to the first row, and measured bytes per parameter
    (of ``bytes_category``, or of everything when None); ``--json`` saves the rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    label = "B/param" if bytes_category is None else f"{bytes_category} B/param"
    print(f"ByteMLP on CPython docs, {args.steps} steps, batch 64, lr 2e-3, seed {args.seed}")
    print(f"{'setting':<34}{'val loss':>10}{'vs first':>10}{label:>26}")
    rows, reference = [], None
    for name, (optimizer, weights) in settings.items():
        val, report = train_bytemlp(optimizer, args.steps, args.seed, weights)
        reference = reference if reference is not None else val
        gap = (val / reference - 1) * 100
        per_param = report.per_parameter(bytes_category)
        print(f"{name:<34}{val:>10.4f}{gap:>+9.2f}%{per_param:>26.3f}", flush=True)
        rows.append(dict(setting=name, val_loss=val, gap_percent=gap, bytes_per_param=per_param,
                         categories=report.categories))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, seed=args.seed, rows=rows), f, indent=1)
