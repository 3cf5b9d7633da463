"""kMaX-DeepLab's training-time copy-paste (on in its mapper unless MODEL.KMAX_DEEPLAB.COPY_PASTE
is False, as the official mapper always does it).

For each training sample, :class:`CopyPaste` draws a second entry of the training list uniformly
(the sample's own entry included; the list is the training loader's, where the official mapper
reads the whole training JSON of its dataset again), maps it with its own augmentations (kMaX: the
scale range halved) and pastes segments of it onto the sample:

* pasted: every non-crowd thing segment of the second sample, and of its non-crowd segments the
  first ``k`` of a random order, ``k`` uniform in ``[0, n]`` (so a random subset of its stuff);
  crowd segments are never pasted;
* both samples sit at the top left of a canvas of ``(max(h1, h2), max(w1, w2))``; the pasted
  pixels take the second sample's image (and semantic labels), the rest keep the first's, and
  ``is_real_pixels`` (bool (H, W)) is True on the first image and on the pasted pixels (what the
  model keeps; it zeroes the rest, as the official mapper's zero padding to IMAGE_SIZE does);
* targets: the first sample's segments minus the pasted pixels (a segment left empty is
  dropped), then the pasted segments; a pasted stuff segment whose class is already a (kept)
  stuff segment is merged into it, as the official mapper tracks one mask per stuff class.

Thing or stuff is the segment's ``isthing`` (every panoptic loader of this package sets it).
Where the official mapper raises (two stuff segments of one class in one image), the pasted
stuff merges into the first of them. A bad second image raises :class:`BadSampleError` with the
second entry's ``index``: the training loader counts that entry as bad and maps the sample again
with fresh draws. All draws come from the ``rng`` the mapper gets (main image's augmentation,
then the second index, its augmentation, the subset), so a seed and a stream position give one
sample.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ...structures import Boxes, Instances
from ..image_io import BadSampleError
from .core import MaskFormerMapper
from .targets import masks_to_boxes, non_crowd, pad_to_multiple

__all__ = ["CopyPaste", "choose_pasted", "paste_sample", "thing_flags"]


def thing_flags(dataset_dict: dict) -> List[bool]:
    """``isthing`` of each non-crowd segment of the dict (the targets' order)."""
    flags = []
    for s in non_crowd(dataset_dict.get("segments_info") or []):
        if "isthing" not in s:
            raise ValueError(
                f"copy-paste needs 'isthing' in every segment of 'segments_info'; segment {s.get('id')} of "
                f"{dataset_dict.get('file_name')} has keys {sorted(s)}")
        flags.append(bool(s["isthing"]))
    return flags


def choose_pasted(things: Sequence[bool], rng: np.random.Generator) -> np.ndarray:
    """Which segments to paste (bool (n,)): the things, and the first ``k ~ U{0..n}`` of a random
    order of all of them."""
    n = len(things)
    order = rng.permutation(n)
    keep = int(rng.integers(0, n + 1))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return np.asarray(things, dtype=bool).reshape(n) | (rank < keep)


def _to_canvas(arr: np.ndarray, size, value) -> np.ndarray:
    """(..., h, w) -> (..., H, W), padded at the bottom/right."""
    moved = np.moveaxis(arr, (-2, -1), (0, 1))
    return np.moveaxis(pad_to_multiple(moved, size, value), (0, 1), (-2, -1))


def paste_sample(main: Dict[str, Any], source: Dict[str, Any], *, main_things: Sequence[bool],
                 source_things: Sequence[bool], pasted: np.ndarray, ignore_label: int) -> Dict[str, Any]:
    """The sample ``main`` with the segments ``pasted`` (bool per target of ``source``) of the
    sample ``source`` pasted on it (see the module docstring). ``main_things`` / ``source_things``:
    ``isthing`` per target of each sample."""
    img1, img2 = main["image"].numpy(), source["image"].numpy()
    (h1, w1), (h2, w2) = img1.shape[-2:], img2.shape[-2:]
    size = (max(h1, h2), max(w1, w2))
    cls1 = main["instances"].gt_classes.tolist()
    cls2 = source["instances"].gt_classes.tolist()
    masks1 = _to_canvas(main["instances"].gt_masks.numpy(), size, False)
    masks2 = _to_canvas(source["instances"].gt_masks.numpy()[pasted], size, False)
    region = masks2.any(axis=0)

    out = dict(main)
    out["image"] = torch.from_numpy(np.where(region, _to_canvas(img2, size, 0), _to_canvas(img1, size, 0)))
    out["is_real_pixels"] = torch.from_numpy(_to_canvas(np.ones((h1, w1), bool), size, False) | region)
    if "sem_seg" in main:
        sem1 = _to_canvas(main["sem_seg"].numpy(), size, ignore_label)
        sem2 = source["sem_seg"].numpy() if "sem_seg" in source else np.full((h2, w2), ignore_label)
        out["sem_seg"] = torch.from_numpy(np.where(region, _to_canvas(sem2, size, ignore_label), sem1))

    classes: List[int] = []
    masks: List[np.ndarray] = []
    stuff_at: Dict[int, int] = {}  # stuff class -> its target, for merging pasted stuff
    for c, thing, m in zip(cls1, main_things, masks1 & ~region):
        if m.any():
            if not thing:
                stuff_at.setdefault(c, len(masks))
            classes.append(c)
            masks.append(m)
    chosen = [(c, t) for c, t, p in zip(cls2, source_things, pasted) if p]
    for (c, thing), m in zip(chosen, masks2):
        if not m.any():
            continue
        if not thing and c in stuff_at:
            masks[stuff_at[c]] = masks[stuff_at[c]] | m
            continue
        if not thing:
            stuff_at[c] = len(masks)
        classes.append(c)
        masks.append(m)

    inst = Instances(size)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64).reshape(-1)
    stacked = np.stack(masks) if masks else np.zeros((0,) + size, dtype=bool)
    inst.gt_masks = torch.from_numpy(stacked)
    if main["instances"].has("gt_boxes"):
        inst.gt_boxes = Boxes(torch.from_numpy(masks_to_boxes(stacked)))
    out["instances"] = inst
    return out


class CopyPaste:
    """Pastes segments of a second training sample onto each sample (see the module docstring).

    Args:
        augmentations: the second image's augmentation list (kMaX: ``build_augmentations(cfg,
            True, "kmax", scale_ratio=0.5)``).
        image_format: INPUT.FORMAT.
        ignore_label: the semantic labels' ignore value (pads ``sem_seg``).
        dataset: the entries second images are drawn from; None: set later by
            :meth:`bind_dataset` (the training loader passes its own list).
    """

    def __init__(self, *, augmentations: Sequence[Any], image_format: str = "BGR", ignore_label: int = 255,
                 dataset: Optional[Sequence[dict]] = None):
        self.source_mapper = MaskFormerMapper(True, augmentations=augmentations, image_format=image_format,
                                              task="panoptic", ignore_label=ignore_label,
                                              name="kMaX copy-paste source")
        self.ignore_label = int(ignore_label)
        self.dataset = dataset

    def __repr__(self) -> str:
        return f"CopyPaste(augmentations={self.source_mapper.augmentations})"

    def bind_dataset(self, dataset: Sequence[dict]) -> None:
        if len(dataset) == 0:
            raise ValueError("copy-paste needs a non-empty dataset to draw second images from")
        self.dataset = dataset

    def __call__(self, sample: Dict[str, Any], dataset_dict: dict, rng: np.random.Generator) -> Dict[str, Any]:
        """``sample`` (mapped from ``dataset_dict``) with a second entry's segments pasted on it."""
        if not self.dataset:
            raise ValueError("copy-paste has no dataset to draw second images from: pass CopyPaste(dataset=...) "
                             "or bind_dataset(), or set MODEL.KMAX_DEEPLAB.COPY_PASTE False "
                             "(build_detection_train_loader binds its dataset itself)")
        index = int(rng.integers(len(self.dataset)))
        second = self.dataset[index]
        try:
            source = self.source_mapper(second, rng)
        except BadSampleError as e:
            raise BadSampleError(e.file, e.reason, e.detail, index=index) from None
        source_things = thing_flags(second)
        return paste_sample(sample, source, main_things=thing_flags(dataset_dict), source_things=source_things,
                            pasted=choose_pasted(source_things, rng), ignore_label=self.ignore_label)
