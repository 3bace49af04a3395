"""ECO's Table 1 treatments (plus ECO with SOLO states) on ByteMLP and CPython's docs.

The two hidden Linear layers (98% of the parameters) hold the treated weights; the embedding and
head stay float32 in every row. Static bytes per parameter of the model = weights (codes and
scales) + master copy + optimizer state, measured from real storage.

    python benchmarks/eco_table.py [--steps 1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from bytemlp import train_bytemlp

FP8 = dict(fmt="fp8_e4m3", granularity="row")
TREATMENTS = {
    "BF16 + master": (dict(weights={"dtype": torch.bfloat16}), dict(weight_update="master")),
    "FP8 + master, RTN": (dict(weights=FP8), dict(weight_update="master", rounding="nearest")),
    "FP8 + master, SR": (dict(weights=FP8), dict(weight_update="master", rounding="stochastic")),
    "FP8 naive, RTN": (dict(weights=FP8), dict(weight_update="naive", rounding="nearest")),
    "FP8 naive, SR": (dict(weights=FP8), dict(weight_update="naive", rounding="stochastic")),
    "FP8 ECO, RTN": (dict(weights=FP8), dict(weight_update="eco", rounding="nearest")),
    "FP8 ECO, SR": (dict(weights=FP8), dict(weight_update="eco", rounding="stochastic")),
    "FP8 ECO, SR + SOLO (4, 2)": (dict(weights=FP8), dict(weight_update="eco", rounding="stochastic",
                                                          state_bits=(4, 2))),
    "FP8 ECO, SR + SOLO (4, 2), SR m": (dict(weights=FP8), dict(
        weight_update="eco", rounding="stochastic", state_bits=(4, 2),
        state_rounding=("stochastic", "stochastic"))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"ByteMLP on CPython docs, {args.steps} steps, batch 64, lr 2e-3, AdamW(0.9, 0.999)")
    print(f"{'treatment':<34}{'val loss':>10}{'vs master':>11}{'static B/param':>16}")
    rows, reference = [], None
    for name, (setup, optimizer) in TREATMENTS.items():
        val, report = train_bytemlp(optimizer, args.steps, args.seed, weights=setup["weights"])
        reference = reference if reference is not None else val
        gap = (val / reference - 1) * 100
        per_param = report.per_parameter()
        print(f"{name:<34}{val:>10.4f}{gap:>+10.2f}%{per_param:>16.3f}", flush=True)
        rows.append(dict(treatment=name, val_loss=val, gap_percent=gap, static_bytes_per_param=per_param,
                         categories=report.categories))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, seed=args.seed, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
