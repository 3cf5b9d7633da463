"""Small helpers for multi-process (``torch.distributed``) runs.

Every helper works without an initialised process group: it then behaves as a single process
(world size 1, rank 0), so code written with them runs unchanged on one CPU.

Objects are exchanged with ``torch.distributed.*_object`` collectives. When the default group
uses NCCL, those collectives run on a lazily created gloo group instead, so that pickled Python
objects (evaluation predictions, confusion matrices) are moved through CPU memory and not GPU
memory.

:func:`init_distributed` joins the process group that torchrun describes in the environment.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "is_dist_initialized",
    "get_world_size",
    "get_rank",
    "is_main_process",
    "synchronize",
    "all_gather",
    "gather",
    "reduce_dict",
]

logger = logging.getLogger(__name__)


def init_distributed(use_cuda: Optional[bool] = None) -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1).

    NCCL when the processes train on CUDA (each on GPU ``LOCAL_RANK``), gloo on CPU. Returns whether
    a process group is in use. Calling it again is harmless.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    use_cuda = bool(use_cuda) and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    logger.info("Joined process group: rank %d of %d (local rank %d, backend %s)",
                dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    return True


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op when there is only one."""
    if get_world_size() <= 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@functools.lru_cache(maxsize=None)
def _object_group():
    """The group used for object collectives: gloo when the default backend is NCCL."""
    if dist.get_backend() == dist.Backend.NCCL:
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(obj: Any) -> List[Any]:
    """Gathers a picklable object from every process; returns the list ordered by rank."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def gather(obj: Any, dst: int = 0) -> List[Any]:
    """Gathers a picklable object on rank ``dst``.

    Returns the list of all processes' objects (ordered by rank) on ``dst`` and ``[]`` elsewhere.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    group = _object_group()
    if get_rank() == dst:
        out: List[Any] = [None] * world_size
        dist.gather_object(obj, out, dst=dst, group=group)
        return out
    dist.gather_object(obj, None, dst=dst, group=group)
    return []


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Reduces scalar tensors with the same keys on all processes to rank 0.

    Rank 0 receives the sum (or, with ``average``, the mean) over processes; the values on the
    other ranks are unspecified, as with ``torch.distributed.reduce``. Keys are processed in
    sorted order so that every process reduces them consistently.
    """
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)
        values = torch.stack([input_dict[k].detach().reshape(()) for k in names], dim=0)
        dist.reduce(values, dst=0)
        if dist.get_rank() == 0 and average:
            values = values / world_size
        return {k: v for k, v in zip(names, values)}
