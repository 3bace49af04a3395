"""LoRDO's open choices (specs/lordo.md), each measured on the default model and corpus with
torchrun: the full-rank term's denominator, moments when Q changes, SVD kind, outer momentum,
and round length. Every run has the same seed, data, steps and ranks as the default LoRDO run.

    python benchmarks/lordo_options.py [--ranks 4] [--batch-size 8] [--steps 300] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from slimtrain.train.compare import markdown_table

VARIANTS = {
    "lordo (mean_v, keep, full SVD)": [],
    "full_rank_scale=rms": ["--lordo=full_rank_scale=rms"],
    "moments_on_refresh=rotate": ["--lordo=moments_on_refresh=rotate"],
    "moments_on_refresh=reset": ["--lordo=moments_on_refresh=reset"],
    "svd=randomized": ["--lordo=svd=randomized"],
    "outer Nesterov (0.7, 0.9)": ["--lordo=outer_lr=0.7", "--lordo=outer_momentum=0.9"],
    "sync_every=8": ["--sync-every=8"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for label, options in VARIANTS.items():
        run_dir = args.out / label.split(" ")[0].replace("=", "-")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.ranks}", "-m", "slimtrain", "train", "--recipe", "lordo",
                   f"--batch-size={args.batch_size}", f"--steps={args.steps}", "--quiet", "--force",
                   "--out", str(run_dir), *options]
        print(f"== {label}", flush=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({**summary, "recipe": label})
    table = markdown_table(rows)
    (args.out / "lordo_options.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
