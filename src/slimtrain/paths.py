"""Where slimtrain keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Downloaded corpora and compiled kernels: ``$SLIMTRAIN_CACHE`` or ``~/.cache/slimtrain``."""
    return Path(os.environ.get("SLIMTRAIN_CACHE", Path.home() / ".cache" / "slimtrain"))
