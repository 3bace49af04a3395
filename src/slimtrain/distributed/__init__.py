"""Data-parallel training with rare, low-rank synchronization (LoRDO) and its baselines, on
torch.distributed, with every byte sent through collectives counted."""

from slimtrain.distributed.comm import Collectives
from slimtrain.distributed.rounds import DiLoCo, LoRDO, RoundsOptimizer

__all__ = ["Collectives", "DiLoCo", "LoRDO", "RoundsOptimizer"]
