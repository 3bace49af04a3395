"""Quality of low-bit optimizer states: validation loss of a byte-level model on real text.

The model (slimtrain.train.models.ByteMLP, 16 bytes of context -> next byte, ~0.6M parameters)
trains on CPython's bundled reference docs with each optimizer setting, same seed and data order;
every tensor with >= 4096 elements gets quantized states. Reports final validation loss (2048
held-out windows), its gap to FP32 AdamW, and measured optimizer-state bytes per parameter.

    python benchmarks/quality.py [--steps 1500] [--json out.json]
"""

from __future__ import annotations

from bytemlp import run_table

PLAIN = dict(state_maps=("dynamic", "dynamic"), state_rounding="nearest", beta1_policy="fixed")
SETTINGS = {
    "adamw fp32": ({}, None),
    "solo (8, 8)": (dict(state_bits=(8, 8)), None),
    "solo (4, 2)": (dict(state_bits=(4, 2)), None),
    "solo (3, 2)": (dict(state_bits=(3, 2)), None),
    "solo (2, 2)": (dict(state_bits=(2, 2)), None),
    "plain (4, 4) dynamic, RTN": (dict(state_bits=(4, 4), **PLAIN), None),
    "plain (4, 2) dynamic, RTN": (dict(state_bits=(4, 2), **PLAIN), None),
    "plain (2, 2) dynamic, RTN": (dict(state_bits=(2, 2), **PLAIN), None),
    # beta1 policy at low-bit m: fixed 0.9 vs the SOLO rule from reference 8 or 5 bits
    "(4, 2) beta1 fixed 0.9": (dict(state_bits=(4, 2), beta1_policy="fixed"), None),
    "(4, 2) beta1 scaled ref 8": (dict(state_bits=(4, 2), beta1_reference_bits=8), None),
    "(2, 2) beta1 fixed 0.9": (dict(state_bits=(2, 2), beta1_policy="fixed"), None),
    "(2, 2) beta1 scaled ref 8": (dict(state_bits=(2, 2), beta1_reference_bits=8), None),
}


if __name__ == "__main__":
    run_table(__doc__.splitlines()[0], SETTINGS, "optimizer_state")
