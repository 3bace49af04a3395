"""Quality of low-bit optimizer states: validation loss of a byte-level model on real text.

The model (slimtrain.train.models.ByteMLP, 16 bytes of context -> next byte, ~0.6M parameters)
trains on CPython's bundled reference docs with each optimizer setting, same seed and data order;
every tensor with >= 4096 elements gets quantized states. Reports final validation loss (2048
held-out windows), its gap to FP32 AdamW, and measured optimizer-state bytes per parameter.

    python benchmarks/quality.py [--steps 1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from bytemlp import train_bytemlp

PLAIN = dict(state_maps=("dynamic", "dynamic"), state_rounding="nearest", beta1_policy="fixed")
SETTINGS = {
    "adamw fp32": {},
    "solo (8, 8)": dict(state_bits=(8, 8)),
    "solo (4, 2)": dict(state_bits=(4, 2)),
    "solo (3, 2)": dict(state_bits=(3, 2)),
    "solo (2, 2)": dict(state_bits=(2, 2)),
    "plain (4, 4) dynamic, RTN": dict(state_bits=(4, 4), **PLAIN),
    "plain (4, 2) dynamic, RTN": dict(state_bits=(4, 2), **PLAIN),
    "plain (2, 2) dynamic, RTN": dict(state_bits=(2, 2), **PLAIN),
    # beta1 policy at low-bit m: fixed 0.9 vs the SOLO rule from reference 8 or 5 bits
    "(4, 2) beta1 fixed 0.9": dict(state_bits=(4, 2), beta1_policy="fixed"),
    "(4, 2) beta1 scaled ref 8": dict(state_bits=(4, 2), beta1_reference_bits=8),
    "(2, 2) beta1 fixed 0.9": dict(state_bits=(2, 2), beta1_policy="fixed"),
    "(2, 2) beta1 scaled ref 8": dict(state_bits=(2, 2), beta1_reference_bits=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"ByteMLP on CPython docs, {args.steps} steps, batch 64, lr 2e-3, seed {args.seed}")
    print(f"{'setting':<28}{'val loss':>10}{'vs fp32':>10}{'state B/param':>15}")
    rows, reference = [], None
    for name, settings in SETTINGS.items():
        val, report = train_bytemlp(settings, args.steps, args.seed)
        per_param = report.per_parameter("optimizer_state")
        reference = reference if reference is not None else val
        gap = (val / reference - 1) * 100
        print(f"{name:<28}{val:>10.4f}{gap:>+9.2f}%{per_param:>15.3f}", flush=True)
        rows.append(dict(setting=name, val_loss=val, gap_percent=gap, state_bytes_per_param=per_param))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, seed=args.seed, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
