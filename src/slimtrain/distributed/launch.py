"""Process groups for training: torchrun's environment, or a single local worker.

``torchrun --nproc-per-node N -m slimtrain train ...`` sets RANK, WORLD_SIZE, MASTER_ADDR, ...;
:func:`start` joins that group (gloo for training on CPU, NCCL on CUDA). Without torchrun, a
recipe that communicates runs as a group of one (on a local file store), so that the same code
path and traffic accounting serve one worker and many.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


DEVICES = ("auto", "cpu", "cuda")  # what a run or a benchmark may be asked to use


def local_device(device: str) -> torch.device:
    """The torch.device of this worker for a run on ``device``: "cpu", "cuda" (under torchrun, rank
    r of a machine uses GPU LOCAL_RANK) or "auto" (CUDA when this torch build sees a GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def start(timeout_seconds: float, device: str = "cpu") -> tuple[int, int]:
    """Join torchrun's process group, or create a group of one. Returns (rank, world size).

    Training on CUDA (``device``, see :func:`local_device`) communicates through NCCL, on the CPU
    through gloo. Collectives that wait longer than ``timeout_seconds`` (a rank that died or
    hangs) raise instead of blocking forever.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    timeout = datetime.timedelta(seconds=timeout_seconds)
    worker_device = local_device(device)
    backend = "nccl" if worker_device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(worker_device)
    if launched_by_torchrun():
        dist.init_process_group(backend, timeout=timeout)
    else:
        handle, store = tempfile.mkstemp(prefix="slimtrain-store-")
        os.close(handle)
        os.unlink(store)  # the file store creates it
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    if backend == "gloo":  # ranks on one machine share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return dist.get_rank(), dist.get_world_size()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def decided_by_rank0(decide: Callable[[], Any]) -> Any:
    """Run ``decide`` on rank 0 only and return its result on every rank; if it raised, raise
    the same kind of error (ValueError or OSError) with its message on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except (ValueError, OSError) as error:
            box[0] = (type(error).__name__, str(error))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "ok":
        return value
    raise (OSError if status == "OSError" else ValueError)(value)


def check_same_everywhere(settings: dict[str, Any]) -> None:
    """ValueError on every rank when ``settings`` differ between ranks (naming the keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, settings)
    differing = sorted({key for other in everyone for key in set(other) | set(settings)
                        if other.get(key) != everyone[0].get(key)})
    if differing:
        raise ValueError(f"the ranks were started with different settings: {', '.join(differing)}")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
