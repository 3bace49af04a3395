"""``slimtrain compare``: several recipes, same seed and data, one table and one frontier plot.

Each recipe trains in its own process (``python -m slimtrain train``), so that its peak process
memory is its own. Outputs in the compare directory: one run directory per recipe,
``compare.md`` (Markdown table), ``compare.json`` and ``frontier.png`` (static memory against
validation loss).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slimtrain.train.data import load_corpus
from slimtrain.train.recipes import get_recipe
from slimtrain.train.trainer import TrainConfig, inapplicable_overrides, prepare_run_dir

DEFAULT_COMPARE_RECIPES = (
    "adamw", "bf16-master", "fp8-master-sr", "fp8-naive-rtn", "fp8-naive-sr", "eco-rtn", "eco-sr",
    "solo-4-2", "solo-2-2", "slim", "int4-eco",
)


def _train_arguments(overrides: dict[str, Any]) -> list[str]:
    """``slimtrain train`` options for TrainConfig ``overrides``."""
    arguments: list[str] = []
    for name, value in overrides.items():
        if name == "compile":
            arguments += [] if value else ["--no-compile"]
        elif name in ("lordo_options", "optim_options"):
            flag = name.removesuffix("_options")
            arguments += [f"--{flag}={key}={option}" for key, option in value.items()]
        else:
            arguments += [f"--{name.replace('_', '-')}", str(value)]
    return arguments


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of run summaries -> Markdown: loss, gap to the reference (``adamw``, else ``ddp``, else
    the first row), static B/param, speed, peak memory, and bytes sent per step and rank when the
    recipes communicate."""
    names = [r["recipe"] for r in rows]
    reference = next((name for name in ("adamw", "ddp") if name in names), names[0])
    reference_loss = rows[names.index(reference)]["val_loss"]
    traffic = any("sent_bytes_per_step" in r for r in rows)
    lines = [f"| recipe | val loss | vs {reference} | static B/param | static MiB | tokens/s | peak RSS MiB |"
             + (" sent KiB/step | traffic vs ddp |" if traffic else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if traffic else "")]
    ddp_traffic = next((r["sent_bytes_per_step"] for r in rows if r["recipe"] == "ddp"), None)
    for r in rows:
        gap = (r["val_loss"] / reference_loss - 1) * 100
        line = (f"| {r['recipe']} | {r['val_loss']:.4f} | {gap:+.2f}% | "
                f"{r['static_bytes_per_param']:.3f} | {r['static_bytes'] / 2**20:.2f} | "
                f"{r['steady_tokens_per_second']:,.0f} | {r['peak_process_memory'] / 2**20:,.0f} |")
        if traffic:
            sent = r.get("sent_bytes_per_step", 0)
            ratio = f"1/{ddp_traffic / sent:.1f}" if ddp_traffic and sent else "—"
            line += f" {sent / 1024:,.1f} | {ratio} |"
        lines.append(line)
    return "\n".join(lines)


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """Static bytes per parameter (log x) against validation loss, one labelled point per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["static_bytes_per_param"], r["val_loss"], s=25)
        ax.annotate(r["recipe"], (r["static_bytes_per_param"], r["val_loss"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("static memory (weights + master + optimizer state), bytes/parameter")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("memory vs loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(recipes: list[str], overrides: dict[str, Any], out_dir: Path | None = None,
            force: bool = False, quiet: bool = False, nproc_per_node: int = 1) -> str:
    """Train each recipe with the same settings (through torchrun with ``nproc_per_node`` ranks
    when > 1; an override a recipe's method does not have, such as sync_every for adamw, is left
    out of that recipe's run, with a note); returns the Markdown table (also written)."""
    config = dataclasses.replace(TrainConfig(), **overrides)
    config.validate()
    load_corpus(config.data, log=lambda _: None)  # a bad --data fails here, once
    out_dir = out_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_run_dir(out_dir, force, resumable=False)
    rows = []
    for recipe in recipes:
        left_out = inapplicable_overrides(get_recipe(recipe), overrides)
        own = {name: value for name, value in overrides.items() if name not in left_out}
        ranks = f"--nproc-per-node={nproc_per_node}"
        launcher = ["-m", "torch.distributed.run", ranks] if nproc_per_node > 1 else []
        command = [sys.executable, *launcher, "-m", "slimtrain", "train", "--recipe", recipe, "--out",
                   str(out_dir / recipe), "--force", *_train_arguments(own)]
        command += ["--quiet"] if quiet else []
        print(f"== {recipe}" + (f" (without {', '.join(left_out)}: not of its method)" if left_out else ""),
              flush=True)
        result = subprocess.run(command)
        if result.returncode:
            raise ValueError(f"recipe {recipe} failed (exit status {result.returncode}); see above")
        rows.append(json.loads((out_dir / recipe / "summary.json").read_text()))
    table = markdown_table(rows)
    (out_dir / "compare.md").write_text(table + "\n")
    (out_dir / "compare.json").write_text(
        json.dumps(dict(overrides=overrides, nproc_per_node=nproc_per_node, rows=rows), indent=1))
    plot_frontier(rows, out_dir / "frontier.png")
    return f"{table}\n\nwritten: {out_dir}/compare.md, compare.json, frontier.png"
