"""Training and inference data loaders.

Training loader
===============
``build_detection_train_loader(cfg, mapper=None, start_iter=0)`` returns an infinite iterator
of batches (``list`` of ``SOLVER.IMS_PER_BATCH // world_size`` mapped samples).

Determinism and resuming
------------------------
Everything random is a pure function of ``seed`` (``cfg.SEED``; a negative value draws a random
seed, logs it and shares it across ranks) and of a sample's *position* in the sample stream, so
that ``start_iter=k`` reproduces exactly the batches an uninterrupted run would have produced
from iteration ``k`` on:

* **Stream.** Global position ``p = 0, 1, 2, ...`` holds dataset index
  ``perm(seed, epoch)[p % N]`` with ``epoch = p // N``; ``perm(seed, epoch)`` is a permutation
  drawn from a generator seeded by ``(seed, epoch)`` alone (no state carried between epochs).
  Rank ``r`` of ``W`` takes the positions ``r, r + W, r + 2W, ...``.
* **Batches.** Without aspect-ratio grouping, iteration ``i`` of a rank takes its local
  positions ``[i*B, (i+1)*B)``, so skipping ahead is a jump. With grouping
  (DATALOADER.ASPECT_RATIO_GROUPING; group = landscape ``w > h`` or not, from the dataset dict's
  original width/height), a batch is emitted when one group has ``B`` samples; the batch plan
  only needs the group of each index, so skipping ahead replays this integer bookkeeping
  (about a microsecond per skipped sample) without reading or mapping any image.
* **Dataset-aware mappers.** A mapper with a true ``needs_dataset`` attribute gets the loader's
  dataset list through ``mapper.bind_dataset(dicts)`` (kMaX's copy-paste draws its second image
  from it).
* **Augmentation.** The sample at position ``p`` is mapped with
  ``rng = numpy.random.default_rng([seed, p, attempt])``, passed to mappers that declare
  ``supports_rng = True`` (:class:`~mask2former.data.dataset_mappers.MaskFormerMapper`). Other
  mappers run with Python's, NumPy's and torch's global RNGs seeded from the same key (and
  restored afterwards). Worker processes, their number and prefetching therefore do not change
  the result.
* **Bad samples.** A mapper raising :class:`BadSampleError` is retried (``attempt + 1``) with a
  replacement index drawn by ``default_rng([seed, p, attempt, 1])`` from the same aspect group,
  so skips are reproducible too. When the bad file is another entry's (``BadSampleError.index``:
  the second image of kMaX's copy-paste), that entry is the one counted as bad and the same index
  is mapped again with the next attempt's draws. A mapper may also reject one draw of a sample
  (reason ``few_labelled_pixels``: kMaX's redraw of samples with too few labelled pixels); it is
  replaced the same way without counting its entry as bad. Skips are counted per reason
  (:func:`skipped_samples`) and logged (the first 10 of each reason, then every 100th). If more
  than half of the distinct dataset entries seen so far (after at least ``min(N, 50)``) were bad,
  or 100 draws in a row fail, a ``RuntimeError`` stops training.

To resume exactly, the trainer resolves ``SEED < 0`` to a drawn seed once, stores it in its
checkpoints with the iteration number, and builds the loader with that seed as ``SEED``.

The samplers and the batch plan are in :mod:`mask2former.data.samplers`; this module holds the
dataset dicts, the mapping with explicit randomness and bad-sample retries, and the loaders.

Inference loader
================
``build_detection_test_loader(cfg, dataset_name, mapper=None)`` yields ``[sample]`` (batch 1) in
dataset order; with several processes each rank gets a contiguous shard (sizes differ by at
most one). Bad samples raise: evaluation must see every image.
"""
from __future__ import annotations

import collections
import logging
import pickle
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils import comm
from ..utils.rng import seed_all_rng, seeded_global_rngs
from .catalog import DatasetCatalog
from .dataset_mappers import build_mapper
from .image_io import FEW_LABELLED_PIXELS, BadSampleError
# The samplers and the batch plan live in data/samplers.py; importable from here as before.
from .samplers import BatchPlan, InferenceSampler, TrainingSampler, aspect_groups

__all__ = [
    "build_detection_train_loader",
    "build_detection_test_loader",
    "get_detection_dataset_dicts",
    "TrainingSampler",
    "InferenceSampler",
    "TrainLoader",
    "skipped_samples",
    "reset_skipped_samples",
]

logger = logging.getLogger(__name__)

_SKIPPED: "collections.Counter[str]" = collections.Counter()
_LOG_FIRST = 10
_LOG_EVERY = 100
_MAX_ATTEMPTS = 100
_MIN_SEEN_FOR_RATIO = 50


def skipped_samples() -> Dict[str, int]:
    """Number of samples skipped by training loaders of this process, per reason."""
    return dict(_SKIPPED)


def reset_skipped_samples() -> None:
    _SKIPPED.clear()


# --------------------------------------------------------------------------- #
# Dataset dicts
# --------------------------------------------------------------------------- #
def _has_usable_annotation(d: dict) -> bool:
    if "annotations" in d:
        return any(not a.get("iscrowd", 0) for a in d["annotations"])
    if "segments_info" in d:
        return any(not s.get("iscrowd", 0) for s in d["segments_info"])
    return True  # semantic datasets: unknown without reading the label map


def get_detection_dataset_dicts(names: Union[str, Sequence[str]],
                                filter_empty: bool = True) -> List[dict]:
    """Concatenate the dicts of the named datasets; with ``filter_empty`` drop images whose
    annotations / segments are all crowd (or absent)."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("no dataset names given (DATASETS.TRAIN / DATASETS.TEST is empty)")
    dicts: List[dict] = []
    for name in names:
        part = DatasetCatalog.get(name)
        if not part:
            raise ValueError(f"dataset {name!r} is empty")
        dicts.extend(part)
    if filter_empty:
        before = len(dicts)
        dicts = [d for d in dicts if _has_usable_annotation(d)]
        if len(dicts) < before:
            logger.info(f"Removed {before - len(dicts)} images without (non-crowd) annotations; "
                        f"{len(dicts)} left")
        if not dicts:
            raise ValueError(f"no image of {list(names)} has a non-crowd annotation")
    return dicts


class _SerializedList:
    """A list of dicts stored as one pickled byte buffer (cheap to share with workers, no
    copy-on-read growth); each access returns a fresh copy."""

    def __init__(self, items: Sequence[Any]):
        blobs = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        self._addr = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, i: int) -> Any:
        start = int(self._addr[i - 1]) if i > 0 else 0
        return pickle.loads(self._data[start:int(self._addr[i])].tobytes())


# --------------------------------------------------------------------------- #
# Mapping with explicit randomness
# --------------------------------------------------------------------------- #
def _call_mapper(mapper: Callable, d: dict, key: Sequence[int]):
    if getattr(mapper, "supports_rng", False):
        return mapper(d, rng=np.random.default_rng(list(key)))
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    with seeded_global_rngs(seed):
        return mapper(d)


class _Mapped:
    """What a worker returns for one stream position."""

    __slots__ = ("sample", "index", "position", "skips")

    def __init__(self, sample, index, position, skips):
        self.sample, self.index, self.position, self.skips = sample, index, position, skips


class _TrainMapDataset(Dataset):
    def __init__(self, dicts: _SerializedList, mapper: Callable, seed: int,
                 groups: Optional[np.ndarray]):
        self.dicts = dicts
        self.mapper = mapper
        self.seed = seed
        if groups is None:
            self.pools = None
        else:
            self.pools = {int(g): np.flatnonzero(groups == g) for g in np.unique(groups)}
            self.groups = groups

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, key: Tuple[int, int]) -> _Mapped:
        position, idx = key
        skips = []
        for attempt in range(_MAX_ATTEMPTS):
            try:
                sample = _call_mapper(self.mapper, self.dicts[idx], (self.seed, position, attempt))
                return _Mapped(sample, idx, position, skips)
            except BadSampleError as e:
                bad = idx if e.index is None else e.index
                skips.append((bad, e.file, e.reason, e.detail))
                if bad != idx:  # another entry's file (a copy-paste source): map this one again
                    continue
            rng = np.random.default_rng([self.seed, position, attempt, 1])
            if self.pools is None:
                idx = int(rng.integers(len(self.dicts)))
            else:
                pool = self.pools[int(self.groups[idx])]
                idx = int(pool[rng.integers(len(pool))])
        last = skips[-1]
        raise RuntimeError(
            f"{_MAX_ATTEMPTS} samples in a row could not be loaded (last: {last[1]}: {last[2]} "
            f"{last[3]}); the dataset looks unusable"
        )


def _trivial_batch(batch):
    return batch


def _worker_init(worker_id: int) -> None:
    seed_all_rng(torch.initial_seed() % 2**32)  # the DataLoader derives it from its seeded generator


class TrainLoader:
    """Infinite iterator of training batches (``list`` of samples); see the module docstring.

    Attributes: ``seed``, ``start_iter``, ``batch_size``, ``sampler``, ``data_loader``.
    """

    def __init__(self, data_loader: DataLoader, sampler: TrainingSampler, batch_size: int,
                 start_iter: int, dataset_size: int):
        self.data_loader = data_loader
        self.sampler = sampler
        self.seed = sampler.seed
        self.batch_size = batch_size
        self.start_iter = start_iter
        self._size = dataset_size
        self._seen: set = set()
        self._bad: set = set()
        self._iter: Optional[Iterator] = None

    def __iter__(self) -> Iterator[List[dict]]:
        for items in self.data_loader:
            batch = []
            for item in items:
                self._account(item)
                batch.append(item.sample)
            yield batch

    def __next__(self) -> List[dict]:
        if self._iter is None:
            self._iter = iter(self)
        return next(self._iter)

    def _account(self, item: _Mapped) -> None:
        for idx, file, reason, detail in item.skips:
            _SKIPPED[reason] += 1
            self._seen.add(idx)
            if reason != FEW_LABELLED_PIXELS:  # the entry is fine; that draw of it was not
                self._bad.add(idx)
            n = _SKIPPED[reason]
            if n <= _LOG_FIRST or n % _LOG_EVERY == 0:
                more = " (further warnings of this kind are rate-limited)" if n == _LOG_FIRST else ""
                logger.warning(f"Skipped a training sample ({reason}, #{n}): {file}"
                               f"{': ' + detail if detail else ''}{more}")
        self._seen.add(item.index)
        if len(self._seen) >= min(self._size, _MIN_SEEN_FOR_RATIO) and \
                2 * len(self._bad) > len(self._seen):
            raise RuntimeError(
                f"{len(self._bad)} of the {len(self._seen)} distinct training samples read so far "
                f"could not be loaded (by reason: {skipped_samples()}); check the dataset files "
                "(see the warnings above for examples)"
            )


def build_detection_train_loader(
    cfg,
    mapper: Optional[Callable] = None,
    start_iter: int = 0,
    *,
    dataset: Optional[Sequence[dict]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> TrainLoader:
    """Infinite, resumable training loader (see the module docstring).

    Args:
        cfg: uses DATASETS.TRAIN, SOLVER.IMS_PER_BATCH, SEED, DATALOADER.{NUM_WORKERS,
            ASPECT_RATIO_GROUPING, FILTER_EMPTY_ANNOTATIONS, SAMPLER_TRAIN} and (without
            ``mapper``) the INPUT keys of :func:`build_mapper`.
        mapper: callable dataset dict -> sample; default ``build_mapper(cfg, True)``.
        start_iter: the first iteration to produce (resume).
        dataset: use these dataset dicts instead of DATASETS.TRAIN.
        rank, world_size: override the ``torch.distributed`` values.
    """
    world_size = comm.get_world_size() if world_size is None else int(world_size)
    rank = comm.get_rank() if rank is None else int(rank)
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by the world size "
                         f"{world_size}")
    batch_size = total // world_size
    sampler_name = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler_name != "TrainingSampler":
        raise NotImplementedError(f"DATALOADER.SAMPLER_TRAIN={sampler_name!r} is not supported "
                                  "(only TrainingSampler)")
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                              cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    dataset = list(dataset)
    if not dataset:
        raise ValueError("the training dataset is empty")
    if mapper is None:
        mapper = build_mapper(cfg, True)

    sampler = TrainingSampler(len(dataset), shuffle=True, seed=cfg.SEED, rank=rank,
                              world_size=world_size)
    groups = aspect_groups(dataset) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    plan = BatchPlan(sampler, batch_size, groups, start_iter)
    dicts = _SerializedList(dataset)
    if getattr(mapper, "needs_dataset", False):  # kMaX's copy-paste draws second images from it
        mapper.bind_dataset(dicts)
    map_ds = _TrainMapDataset(dicts, mapper, sampler.seed, groups)
    num_workers = int(cfg.DATALOADER.NUM_WORKERS)
    data_loader = DataLoader(
        map_ds,
        batch_sampler=plan,
        num_workers=num_workers,
        collate_fn=_trivial_batch,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(sampler.seed + rank),
    )
    logger.info(f"Training loader: {len(dataset)} images, batch {batch_size} per process, "
                f"seed {sampler.seed}, starting at iteration {start_iter}")
    return TrainLoader(data_loader, sampler, batch_size, start_iter, len(dataset))


# --------------------------------------------------------------------------- #
# Inference
# --------------------------------------------------------------------------- #
class _TestMapDataset(Dataset):
    def __init__(self, dicts: _SerializedList, mapper: Callable):
        self.dicts = dicts
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, idx: int):
        return _call_mapper(self.mapper, self.dicts[idx], (0, idx, 0))


def build_detection_test_loader(
    cfg,
    dataset_name: Union[str, Sequence[str]],
    mapper: Optional[Callable] = None,
    *,
    dataset: Optional[Sequence[dict]] = None,
    num_workers: Optional[int] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DataLoader:
    """Batch-1, in-order loader over ``dataset_name`` (this rank's shard); yields ``[sample]``.

    ``mapper`` defaults to ``build_mapper(cfg, is_train=False)`` (resize to MIN_SIZE_TEST /
    MAX_SIZE_TEST); ``num_workers`` to DATALOADER.NUM_WORKERS.
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(dataset_name, filter_empty=False)
    dataset = list(dataset)
    if mapper is None:
        mapper = build_mapper(cfg, False)
    if num_workers is None:
        num_workers = int(cfg.DATALOADER.NUM_WORKERS)
    return DataLoader(
        _TestMapDataset(_SerializedList(dataset), mapper),
        batch_size=1,
        sampler=InferenceSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        collate_fn=_trivial_batch,
    )
