"""Collectives through torch.distributed, with every byte a rank sends counted.

The count is the payload a rank contributes to each collective (numel x element size of the
tensor it passes), whatever algorithm the backend uses (a ring all-reduce puts 2 (M-1)/M of it
on the wire per rank). With no process group (a single worker) collectives are the identity
and still count what would be sent, so traffic is comparable across world sizes.
"""

# no ``from __future__ import annotations``: DistributedDataParallel checks the hook's
# ``bucket: dist.GradBucket`` annotation as an object, not a string
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist


class Collectives:
    """All-reduce and broadcast over ``group`` (the default group when torch.distributed is
    initialized), counting bytes sent per purpose in :attr:`sent` (purpose -> bytes)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        nccl = self.active and dist.get_backend(group) == "nccl"  # NCCL reduces CUDA tensors only
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.sent: Counter[str] = Counter()

    @property
    def total_sent(self) -> int:
        """Bytes this rank has sent through these collectives."""
        return sum(self.sent.values())

    def count(self, tensor: torch.Tensor, purpose: str) -> None:
        self.sent[purpose] += tensor.numel() * tensor.element_size()

    def all_reduce_mean_(self, tensor: torch.Tensor, purpose: str) -> torch.Tensor:
        """Replace ``tensor`` by its mean over the ranks (in place)."""
        self.count(tensor, purpose)
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            tensor.div_(self.world_size)
        return tensor

    def any_(self, flag: bool, purpose: str = "control") -> bool:
        """Whether ``flag`` is true on any rank (a 4-byte all-reduce)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        self.count(value, purpose)
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def ddp_comm_hook(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """A DistributedDataParallel communication hook: the usual gradient all-reduce (mean),
        counted as purpose "gradients". Register with ``ddp.register_comm_hook(None, hook)``."""
        tensor = bucket.buffer()
        self.count(tensor, "gradients")
        tensor.div_(self.world_size)
        if self.world_size == 1:
            future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            future.set_result(tensor)
            return future
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return work.get_future().then(lambda f: f.value()[0])
