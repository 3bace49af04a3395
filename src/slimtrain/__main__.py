"""``python -m slimtrain`` is the ``slimtrain`` command (used by ``slimtrain compare`` and torchrun)."""

from slimtrain.cli import main

raise SystemExit(main())
