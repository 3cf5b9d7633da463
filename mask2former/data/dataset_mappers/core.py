"""The single mapper core, :class:`MaskFormerMapper`: dataset dict -> training / inference sample.

Training sample: ``file_name``, ``image_id``, ``height``/``width`` (original size), ``image``
(uint8 (3, H, W) in INPUT.FORMAT order), ``instances`` (``gt_classes`` int64 (N,), ``gt_masks``
bool (N, H, W), optionally ``gt_boxes``) and, when the dict has a semantic PNG, ``sem_seg``
(int64 (H, W)). Inference sample: the dict without ``annotations``, plus the resized ``image``.
What the targets are per task is in :mod:`.targets`; which configurations exist is in
:mod:`.official`.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...structures import Boxes, Instances
from .. import transforms as T
from ..ids import rgb2id
from ..image_io import read_image, read_label_map
from .targets import (
    category_map,
    check_same_size,
    instance_masks,
    masks_to_boxes,
    pad_to_multiple,
    panoptic_masks,
    semantic_masks,
)

__all__ = ["MaskFormerMapper", "TASKS"]

logger = logging.getLogger(__name__)

TASKS = ("semantic", "panoptic", "instance")


class MaskFormerMapper:
    """The single mapper core; see the package docstring.

    Args:
        is_train: training (augment, build targets) or inference (resize only).
        augmentations: list of :class:`~mask2former.data.transforms.Augmentation` / Transform.
        image_format: INPUT.FORMAT ("BGR" or "RGB").
        task: "semantic", "panoptic" or "instance" (which targets to build).
        ignore_label: label of unlabelled pixels in semantic maps (used for padding and to skip
            that label when building per-class masks).
        size_divisibility: > 0: pad training samples to a multiple of it.
        filter_empty_instances: drop instance masks that are empty after augmentation.
        with_boxes: also return ``instances.gt_boxes`` (tight boxes of the masks).
        name: the registry name, for logging.
    """

    supports_rng = True  # the loader passes ``rng=`` (see mask2former.data.build)

    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[Any],
        image_format: str = "BGR",
        task: str = "semantic",
        ignore_label: int = 255,
        size_divisibility: int = -1,
        filter_empty_instances: bool = False,
        with_boxes: bool = False,
        name: str = "",
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.is_train = is_train
        self.augmentations = list(augmentations)
        self.image_format = image_format
        self.task = task
        self.ignore_label = int(ignore_label)
        self.size_divisibility = int(size_divisibility or 0)
        self.filter_empty_instances = filter_empty_instances
        self.with_boxes = with_boxes
        self.name = name or type(self).__name__
        self._needs_category_map = any(
            isinstance(a, T.RandomCropCategoryAreaConstraint) and a.single_category_max_area < 1.0
            for a in self.augmentations
        )
        mode = "training" if is_train else "inference"
        logger.info(f"[{self.name}] {task} mapper, augmentations for {mode}: {self.augmentations}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, is_train={self.is_train}, "
                f"task={self.task!r}, augmentations={self.augmentations})")

    # ------------------------------------------------------------------ API
    def __call__(self, dataset_dict: dict, rng: Optional[np.random.Generator] = None) -> dict:
        return self.map_with_transforms(dataset_dict, rng)[0]

    def map_with_transforms(
        self, dataset_dict: dict, rng: Optional[np.random.Generator] = None
    ) -> Tuple[dict, T.TransformList]:
        """Like ``__call__``, also returning the geometric/photometric transform applied."""
        if rng is None:
            rng = np.random.default_rng(int(np.random.randint(0, 2**31 - 1)))
        file_name = dataset_dict["file_name"]
        image = read_image(file_name, self.image_format)
        orig_size = image.shape[:2]
        if "height" in dataset_dict and "width" in dataset_dict:
            check_same_size(file_name, "the image", orig_size,
                            (int(dataset_dict["height"]), int(dataset_dict["width"])),
                            "the dataset dict")
        if not self.is_train:
            return self._map_inference(dataset_dict, image, rng)
        return self._map_train(dataset_dict, image, rng)

    # ------------------------------------------------------------ inference
    def _map_inference(self, d: dict, image: np.ndarray, rng) -> Tuple[dict, T.TransformList]:
        aug_input = T.AugInput(image)
        tfm = T.apply_augmentations(self.augmentations, aug_input, rng)
        out = {k: copy.deepcopy(v) for k, v in d.items() if k != "annotations"}
        out["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        out["height"], out["width"] = image.shape[:2]
        return out, tfm

    # ------------------------------------------------------------- training
    def _read_targets(self, d: dict, orig_size: Tuple[int, int]):
        """(sem_seg, pan_seg, segments, annos) of the dict at the original size, per task."""
        sem_seg = pan_seg = None
        segments: List[dict] = []
        annos: List[dict] = []
        if "sem_seg_file_name" in d and self.task in ("semantic", "panoptic"):
            sem_seg = read_label_map(d["sem_seg_file_name"]).astype(np.int32)
            check_same_size(d["sem_seg_file_name"], "the semantic label map", sem_seg.shape,
                            orig_size, f"the image {d['file_name']}")
        if self.task == "semantic" and sem_seg is None:
            raise ValueError(
                f"[{self.name}] semantic mapper needs 'sem_seg_file_name' in the dataset dict of "
                f"{d['file_name']}; check INPUT.DATASET_MAPPER_NAME against the dataset"
            )
        if self.task == "panoptic":
            if "pan_seg_file_name" not in d:
                raise ValueError(
                    f"[{self.name}] panoptic mapper needs 'pan_seg_file_name' and 'segments_info' "
                    f"in the dataset dict of {d['file_name']}"
                )
            pan_file = d["pan_seg_file_name"]
            pan_rgb = read_image(pan_file, "RGB")
            check_same_size(pan_file, "the panoptic PNG", pan_rgb.shape[:2], orig_size,
                            f"the image {d['file_name']}")
            pan_seg = rgb2id(pan_rgb).astype(np.int32)  # the transforms resize int32 maps
            segments = list(d.get("segments_info") or [])
        if self.task == "instance":
            if "annotations" not in d:
                raise ValueError(
                    f"[{self.name}] instance mapper needs 'annotations' in the dataset dict of "
                    f"{d['file_name']}"
                )
            annos = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
        return sem_seg, pan_seg, segments, annos

    def _map_train(self, d: dict, image: np.ndarray, rng) -> Tuple[dict, T.TransformList]:
        orig_size = image.shape[:2]
        sem_seg, pan_seg, segments, annos = self._read_targets(d, orig_size)

        # The map the category-area crop looks at: the semantic labels, or (panoptic datasets
        # without semantic PNGs) the category of each panoptic segment.
        guide = sem_seg
        if guide is None and pan_seg is not None and self._needs_category_map:
            guide = category_map(pan_seg, segments, self.ignore_label)
        aug_input = T.AugInput(image, guide, sem_seg_pad=self.ignore_label)
        tfm = T.apply_augmentations(self.augmentations, aug_input, rng)
        image = aug_input.image
        if sem_seg is not None:
            sem_seg = aug_input.sem_seg
        if pan_seg is not None:
            pan_seg = T.apply_segmentation(tfm, pan_seg, 0)  # 0 = VOID
        h, w = image.shape[:2]

        masks: Optional[np.ndarray] = None
        if self.task == "instance":
            classes, masks = instance_masks(annos, tfm, d["file_name"], orig_size, (h, w))

        # pad to a multiple of SIZE_DIVISIBILITY
        if self.size_divisibility > 0:
            s = self.size_divisibility
            size = (-(-h // s) * s, -(-w // s) * s)
            image = pad_to_multiple(image, size, 128)
            if sem_seg is not None:
                sem_seg = pad_to_multiple(sem_seg, size, self.ignore_label)
            if pan_seg is not None:
                pan_seg = pad_to_multiple(pan_seg, size, 0)
            if masks is not None:
                masks = pad_to_multiple(masks.transpose(1, 2, 0), size, False).transpose(2, 0, 1)
            h, w = size

        if self.task == "semantic":
            classes, masks = semantic_masks(sem_seg, self.ignore_label)
        elif self.task == "panoptic":
            classes, masks = panoptic_masks(pan_seg, segments)

        if self.filter_empty_instances and len(masks):
            nonempty = masks.reshape(len(masks), -1).any(axis=1)
            masks = masks[nonempty]
            classes = [c for c, k in zip(classes, nonempty) if k]

        instances = Instances((h, w))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64).reshape(-1)
        instances.gt_masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
        if self.with_boxes:
            instances.gt_boxes = Boxes(torch.from_numpy(masks_to_boxes(masks)))

        out = {
            "file_name": d["file_name"],
            "image_id": d.get("image_id"),
            "height": int(orig_size[0]),
            "width": int(orig_size[1]),
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "instances": instances,
        }
        if sem_seg is not None:
            out["sem_seg"] = torch.from_numpy(sem_seg.astype(np.int64))
        return out, tfm
