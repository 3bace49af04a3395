"""ECO's Table 1 treatments (plus ECO with SOLO states) on ByteMLP and CPython's docs.

The two hidden Linear layers (98% of the parameters) hold the treated weights; the embedding and
head stay float32 in every row. Static bytes per parameter of the model = weights (codes and
scales) + master copy + optimizer state, measured from real storage.

    python benchmarks/eco_table.py [--steps 1500] [--json out.json]
"""

from __future__ import annotations

import torch

from bytemlp import run_table

FP8 = dict(fmt="fp8_e4m3", granularity="row")
SETTINGS = {
    "BF16 + master": (dict(weight_update="master"), {"dtype": torch.bfloat16}),
    "FP8 + master, RTN": (dict(weight_update="master", rounding="nearest"), FP8),
    "FP8 + master, SR": (dict(weight_update="master", rounding="stochastic"), FP8),
    "FP8 naive, RTN": (dict(weight_update="naive", rounding="nearest"), FP8),
    "FP8 naive, SR": (dict(weight_update="naive", rounding="stochastic"), FP8),
    "FP8 ECO, RTN": (dict(weight_update="eco", rounding="nearest"), FP8),
    "FP8 ECO, SR": (dict(weight_update="eco", rounding="stochastic"), FP8),
    "FP8 ECO, SR + SOLO (4, 2)": (
        dict(weight_update="eco", rounding="stochastic", state_bits=(4, 2)), FP8),
    "FP8 ECO, SR + SOLO (4, 2), SR m": (dict(
        weight_update="eco", rounding="stochastic", state_bits=(4, 2),
        state_rounding=("stochastic", "stochastic")), FP8),
}


if __name__ == "__main__":
    run_table(__doc__.splitlines()[0], SETTINGS, None)
