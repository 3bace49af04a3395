"""Command line: ``slimtrain demo``."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from tqdm import tqdm

import slimtrain as st
from slimtrain.train.data import byte_tokens, python_docs_text, random_windows, split_tokens
from slimtrain.train.models import ByteMLP


def _demo_run(make_optimizer, tokens, val_tokens, steps: int, seed: int, label: str):
    torch.manual_seed(seed)
    model = ByteMLP()
    optimizer = make_optimizer(model.parameters())
    data_rng = torch.Generator().manual_seed(seed)
    context = model.context
    bar = tqdm(range(steps), desc=label, leave=False, file=sys.stderr, disable=None)
    for _ in bar:
        x, y = random_windows(tokens, 64, context, data_rng)
        loss = nn.functional.cross_entropy(model(x), y[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        x, y = random_windows(val_tokens, 2048, context, torch.Generator().manual_seed(1))
        val = nn.functional.cross_entropy(model(x), y[:, -1]).item()
    return val, st.memory_report(model, optimizer)


def demo(steps: int, seed: int) -> None:
    """Train the same byte-level model with torch.optim.AdamW and st.AdamW(state_bits=(4, 2))."""
    tokens, val_tokens = split_tokens(byte_tokens(python_docs_text()))
    print(f"corpus: CPython reference docs, {tokens.numel():,} training bytes; {steps} steps")
    runs = {
        "torch.optim.AdamW": lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0),
        "st.AdamW(state_bits=(4, 2))": lambda p: st.AdamW(
            p, lr=2e-3, weight_decay=0.0, state_bits=(4, 2)
        ),
    }
    print(f"{'optimizer':<30}{'val loss':>10}{'state bytes':>14}{'bytes/param':>13}")
    for label, make in runs.items():
        val, report = _demo_run(make, tokens, val_tokens, steps, seed, label)
        state = report.categories["optimizer_state"]
        print(f"{label:<30}{val:>10.4f}{state:>14,}{report.per_parameter('optimizer_state'):>13.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtrain", description=st.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="4/2-bit AdamW beside torch's AdamW")
    demo_parser.add_argument("--steps", type=int, default=600)
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be a positive integer")
    demo(args.steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
