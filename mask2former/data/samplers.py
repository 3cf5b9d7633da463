"""Samplers and the batch plan of the data loaders (the contract is in :mod:`mask2former.data.build`).

* :class:`TrainingSampler`: the infinite, per-epoch shuffled stream of dataset indices; global
  position ``p`` holds ``perm(seed, p // N)[p % N]``; rank ``r`` of ``W`` takes ``r, r + W, ...``.
* :class:`BatchPlan`: the batches ``[(position, dataset_index), ...]`` of one rank from a start
  iteration on, with or without aspect-ratio grouping (:func:`aspect_groups`).
* :class:`InferenceSampler`: every index once, in order, one contiguous shard per rank.
"""
from __future__ import annotations

import collections
import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from ..utils import comm
from ..utils.rng import resolve_seed
from .image_io import BadSampleError, read_image_size

__all__ = ["TrainingSampler", "InferenceSampler", "BatchPlan", "aspect_groups"]

logger = logging.getLogger(__name__)


class TrainingSampler(Sampler):
    """Infinite stream of dataset indices, shuffled per epoch, sharded by rank.

    Position ``p`` of the global stream holds ``perm(seed, p // size)[p % size]``; this rank
    yields positions ``rank, rank + world_size, ...``. See the module docstring.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        self.size = int(size)
        self.shuffle = shuffle
        self.seed = resolve_seed(seed, "data seed")
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.size)
            self._perm_epoch = epoch
        return self._perm

    def index_at(self, position: int) -> int:
        """Dataset index at a global stream position."""
        if not self.shuffle:
            return position % self.size
        return int(self.permutation(position // self.size)[position % self.size])

    def positions(self, start: int = 0) -> Iterator[int]:
        """Global positions of this rank, from its ``start``-th one on."""
        p = start * self.world_size + self.rank
        while True:
            yield p
            p += self.world_size

    def __iter__(self) -> Iterator[int]:
        for p in self.positions():
            yield self.index_at(p)


class InferenceSampler(Sampler):
    """Each index exactly once, in order; rank ``r`` gets the ``r``-th contiguous shard."""

    def __init__(self, size: int, rank: Optional[int] = None, world_size: Optional[int] = None):
        rank = comm.get_rank() if rank is None else int(rank)
        world_size = comm.get_world_size() if world_size is None else int(world_size)
        shard, extra = divmod(size, world_size)
        begin = rank * shard + min(rank, extra)
        self._indices = range(begin, begin + shard + (1 if rank < extra else 0))

    def __iter__(self):
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


class BatchPlan:
    """Iterable of batches ``[(position, dataset_index), ...]`` for iterations >= start_iter."""

    def __init__(self, sampler: TrainingSampler, batch_size: int,
                 groups: Optional[np.ndarray], start_iter: int = 0):
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.groups = groups
        self.start_iter = int(start_iter)

    def __iter__(self):
        s, bsz = self.sampler, self.batch_size
        if self.groups is None:
            positions = s.positions(self.start_iter * bsz)
            while True:
                batch = []
                for _ in range(bsz):
                    p = next(positions)
                    batch.append((p, s.index_at(p)))
                yield batch
        buckets: Dict[int, List[Tuple[int, int]]] = collections.defaultdict(list)
        iteration = 0
        groups = self.groups
        for p in s.positions(0):
            idx = s.index_at(p)
            bucket = buckets[int(groups[idx])]
            bucket.append((p, idx))
            if len(bucket) == bsz:
                if iteration >= self.start_iter:
                    yield list(bucket)
                iteration += 1
                bucket.clear()


def aspect_groups(dicts: Sequence[dict]) -> np.ndarray:
    """0 for landscape (w > h), 1 otherwise, from the dicts' original sizes (image headers are
    read for dicts without height/width; unreadable ones go to group 0)."""
    groups = np.zeros(len(dicts), dtype=np.int8)
    n_read = 0
    for i, d in enumerate(dicts):
        if "height" in d and "width" in d:
            h, w = d["height"], d["width"]
        else:
            n_read += 1
            try:
                h, w = read_image_size(d["file_name"])
            except BadSampleError:
                continue
        groups[i] = 0 if w > h else 1
    if n_read:
        logger.info(f"Aspect-ratio grouping: read the size of {n_read} images from their headers")
    return groups
