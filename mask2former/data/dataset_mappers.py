"""Dataset mappers: dataset dict -> training / inference sample.

The official code has five near-identical mapper classes; here there is one core,
:class:`MaskFormerMapper`, and the official ``INPUT.DATASET_MAPPER_NAME`` values are thin
configurations of it (see :data:`MAPPER_REGISTRY`):

=========================  ======================================================  ==========
name                       augmentations (training)                                targets
=========================  ======================================================  ==========
``mask_former_semantic``   ResizeShortestEdge, [category-area crop], [SSD color],  semantic
                           flip
``mask_former_panoptic``   same as semantic                                        panoptic
``mask_former_instance``   ResizeShortestEdge, [plain crop], [SSD color], flip     instance
``coco_panoptic_lsj``      flip, ResizeScale, FixedSizeCrop (IMAGE_SIZE)           panoptic
``coco_instance_lsj``      flip, ResizeScale, FixedSizeCrop (IMAGE_SIZE)           instance
=========================  ======================================================  ==========

Targets ("instances" with ``gt_classes`` int64 (N,) and ``gt_masks`` bool (N, H, W)):

* semantic: one mask per class present in the label map (the ignore label excluded);
  ``sem_seg`` (int64, (H, W)) is also returned.
* panoptic: one mask per non-crowd segment of ``segments_info``; ``sem_seg`` is returned too
  when the dict has a ``sem_seg_file_name``.
* instance: one mask per non-crowd annotation (polygons or RLE); the LSJ variant drops masks
  that the crop emptied and adds ``gt_boxes`` (as the official LSJ mapper does).

With ``INPUT.SIZE_DIVISIBILITY > 0`` training samples are padded at the bottom/right to the
next multiple of it: the image with 128, ``sem_seg`` with the ignore label, masks with False.

At inference (``is_train=False``) every mapper only resizes the image (MIN_SIZE_TEST /
MAX_SIZE_TEST); "height"/"width" stay the original size so that predictions can be resized back.

Problems with a sample's files (missing file, unreadable/corrupt image or PNG, image size that
disagrees with the dict or with its annotation PNG, malformed RLE) raise
:class:`BadSampleError`; the training loader skips such samples and counts them.
Configuration problems (e.g. a semantic mapper on a dict without ``sem_seg_file_name``) raise
``ValueError``.

Randomness: ``mapper(dataset_dict, rng=generator)`` draws every random number from ``rng``
(``numpy.random.Generator``); the training loader passes one derived from (seed, stream
position). Without ``rng`` a generator seeded from numpy's global RNG is used.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..structures import Boxes, Instances
from .catalog import MetadataCatalog
from .ids import rgb2id  # noqa: F401  (was defined here)
from .image_io import (  # noqa: F401  (BadSampleError and the readers were defined here before)
    BAD_ANNOTATION,
    CORRUPT_FILE,
    MISSING_FILE,
    SIZE_MISMATCH,
    BadSampleError,
    open_image,
    read_image,
    read_label_map,
)
from . import transforms as T

__all__ = [
    "BadSampleError",
    "MaskFormerMapper",
    "MAPPER_REGISTRY",
    "register_mapper",
    "build_mapper",
    "build_augmentations",
    "read_image",
    "read_label_map",
    "rgb2id",
]

logger = logging.getLogger(__name__)

TASKS = ("semantic", "panoptic", "instance")


def _check_same_size(file_name: str, what: str, got: Tuple[int, int], expected: Tuple[int, int],
                     reference: str) -> None:
    if tuple(got) != tuple(expected):
        raise BadSampleError(
            file_name, SIZE_MISMATCH,
            f"{what} is {got[1]}x{got[0]} (WxH) but {reference} says {expected[1]}x{expected[0]}",
        )


# --------------------------------------------------------------------------- #
# Target helpers
# --------------------------------------------------------------------------- #
def _pad_to_multiple(arr: np.ndarray, size: Tuple[int, int], value) -> np.ndarray:
    """Pad the first two axes of ``arr`` at the bottom/right up to ``size``."""
    ph, pw = size[0] - arr.shape[0], size[1] - arr.shape[1]
    if ph == 0 and pw == 0:
        return arr
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant", constant_values=value)


def _masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) XYXY boxes (pixel extents; zeros for empty masks)."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        if len(ys) and len(xs):
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def _polygons_to_mask(polygons: Sequence[Sequence[float]], tfm: T.Transform,
                      height: int, width: int) -> np.ndarray:
    """Transform polygon vertices with ``tfm`` and rasterise them at ``(height, width)``."""
    flat = []
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) < 3:
            continue
        pts = tfm.apply_coords(pts.copy())
        flat.append(pts.reshape(-1).tolist())
    if not flat:
        return np.zeros((height, width), dtype=bool)
    rle = mask_util.merge(mask_util.frPyObjects(flat, height, width))
    return mask_util.decode(rle).astype(bool)


def _decode_rle(segm: dict, file_name: str, orig_size: Tuple[int, int]) -> np.ndarray:
    try:
        h, w = (int(v) for v in segm["size"])
        if isinstance(segm["counts"], list):
            segm = mask_util.frPyObjects(segm, h, w)
        mask = mask_util.decode(segm)
    except Exception as e:
        raise BadSampleError(file_name, BAD_ANNOTATION, f"malformed RLE: {type(e).__name__}: {e}")
    _check_same_size(file_name, "an RLE mask", mask.shape[:2], orig_size, "the image")
    return mask.astype(bool)


# --------------------------------------------------------------------------- #
# The mapper
# --------------------------------------------------------------------------- #
class MaskFormerMapper:
    """The single mapper core; see the module docstring.

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
        return (f"MaskFormerMapper(name={self.name!r}, is_train={self.is_train}, task={self.task!r}, "
                f"augmentations={self.augmentations})")

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
            _check_same_size(file_name, "the image", orig_size,
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
    def _map_train(self, d: dict, image: np.ndarray, rng) -> Tuple[dict, T.TransformList]:
        orig_size = image.shape[:2]
        sem_seg = pan_seg = None
        segments: List[dict] = []
        annos: List[dict] = []

        if "sem_seg_file_name" in d and self.task in ("semantic", "panoptic"):
            sem_seg = read_label_map(d["sem_seg_file_name"]).astype(np.int32)
            _check_same_size(d["sem_seg_file_name"], "the semantic label map", sem_seg.shape,
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
            _check_same_size(pan_file, "the panoptic PNG", pan_rgb.shape[:2], orig_size,
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

        # The map the category-area crop looks at: the semantic labels, or (panoptic datasets
        # without semantic PNGs) the category of each panoptic segment.
        guide = sem_seg
        if guide is None and pan_seg is not None and self._needs_category_map:
            guide = self._category_map(pan_seg, segments)
        aug_input = T.AugInput(image, guide, sem_seg_pad=self.ignore_label)
        tfm = T.apply_augmentations(self.augmentations, aug_input, rng)
        image = aug_input.image
        if sem_seg is not None:
            sem_seg = aug_input.sem_seg
        if pan_seg is not None:
            pan_seg = T.apply_segmentation(tfm, pan_seg, 0)  # 0 = VOID
        h, w = image.shape[:2]

        classes: List[int] = []
        masks: Optional[np.ndarray] = None
        if self.task == "instance":
            classes, masks = self._instance_masks(annos, tfm, d["file_name"], orig_size, (h, w))

        # pad to a multiple of SIZE_DIVISIBILITY
        if self.size_divisibility > 0:
            s = self.size_divisibility
            size = (-(-h // s) * s, -(-w // s) * s)
            image = _pad_to_multiple(image, size, 128)
            if sem_seg is not None:
                sem_seg = _pad_to_multiple(sem_seg, size, self.ignore_label)
            if pan_seg is not None:
                pan_seg = _pad_to_multiple(pan_seg, size, 0)
            if masks is not None:
                masks = _pad_to_multiple(masks.transpose(1, 2, 0), size, False).transpose(2, 0, 1)
            h, w = size

        if self.task == "semantic":
            labels = np.unique(sem_seg)
            labels = labels[labels != self.ignore_label]
            classes = [int(c) for c in labels]
            masks = np.stack([sem_seg == c for c in labels]) if len(labels) else None
        elif self.task == "panoptic":
            keep = [s for s in segments if not s.get("iscrowd", 0)]
            classes = [int(s["category_id"]) for s in keep]
            masks = np.stack([pan_seg == s["id"] for s in keep]) if keep else None
        if masks is None:
            masks = np.zeros((0, h, w), dtype=bool)

        if self.filter_empty_instances and len(masks):
            nonempty = masks.reshape(len(masks), -1).any(axis=1)
            masks = masks[nonempty]
            classes = [c for c, k in zip(classes, nonempty) if k]

        instances = Instances((h, w))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64).reshape(-1)
        instances.gt_masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
        if self.with_boxes:
            instances.gt_boxes = Boxes(torch.from_numpy(_masks_to_boxes(masks)))

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

    # --------------------------------------------------------------- helpers
    def _category_map(self, pan_seg: np.ndarray, segments: List[dict]) -> np.ndarray:
        ids, inverse = np.unique(pan_seg, return_inverse=True)
        lut = np.full(len(ids), self.ignore_label, dtype=np.int64)
        pos = {int(v): i for i, v in enumerate(ids)}
        for s in segments:
            i = pos.get(int(s["id"]))
            if i is not None:
                lut[i] = int(s["category_id"])
        return lut[inverse.reshape(pan_seg.shape)]

    def _instance_masks(self, annos: List[dict], tfm: T.Transform, file_name: str,
                        orig_size: Tuple[int, int], size: Tuple[int, int]):
        classes, masks = [], []
        rle_idx, rle_masks = [], []
        for anno in annos:
            segm = anno.get("segmentation")
            classes.append(int(anno["category_id"]))
            if isinstance(segm, list):
                try:
                    masks.append(_polygons_to_mask(segm, tfm, *size))
                except Exception as e:
                    raise BadSampleError(file_name, BAD_ANNOTATION,
                                         f"malformed polygon: {type(e).__name__}: {e}") from None
            elif isinstance(segm, dict):
                rle_idx.append(len(masks))
                rle_masks.append(_decode_rle(segm, file_name, orig_size))
                masks.append(None)
            elif isinstance(segm, np.ndarray) and segm.ndim == 2:
                _check_same_size(file_name, "a mask array", segm.shape, orig_size, "the image")
                rle_idx.append(len(masks))
                rle_masks.append(segm.astype(bool))
                masks.append(None)
            else:
                raise BadSampleError(
                    file_name, BAD_ANNOTATION,
                    f"unsupported segmentation of type {type(segm).__name__} (expected polygons, "
                    "RLE dict or an HxW array)",
                )
        if rle_masks:  # transform all full-image masks at once, as an (H, W, K) stack
            stack = T.apply_segmentation(tfm, np.stack(rle_masks, axis=2), False)
            for k, i in enumerate(rle_idx):
                masks[i] = stack[:, :, k]
        arr = np.stack(masks) if masks else np.zeros((0,) + tuple(size), dtype=bool)
        return classes, arr


# --------------------------------------------------------------------------- #
# Configurations
# --------------------------------------------------------------------------- #
MAPPER_REGISTRY: Dict[str, Callable[..., MaskFormerMapper]] = {}


def register_mapper(name: str):
    """Decorator: register ``fn(cfg, is_train) -> mapper`` under INPUT.DATASET_MAPPER_NAME."""

    def deco(fn):
        if name in MAPPER_REGISTRY:
            raise KeyError(f"dataset mapper {name!r} is already registered")
        MAPPER_REGISTRY[name] = fn
        return fn

    return deco


def _flip(cfg) -> List[T.Augmentation]:
    mode = cfg.INPUT.RANDOM_FLIP
    if mode == "none":
        return []
    if mode not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {mode!r}")
    return [T.RandomFlip(horizontal=mode == "horizontal", vertical=mode == "vertical")]


def build_augmentations(cfg, is_train: bool, style: str = "resize_crop",
                        category_area_crop: bool = True) -> List[T.Augmentation]:
    """The augmentation list.

    ``style="resize_crop"`` (MaskFormer mappers): ResizeShortestEdge(MIN_SIZE_TRAIN,
    MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING); if INPUT.CROP.ENABLED a random crop
    (INPUT.CROP.TYPE/SIZE; with the SINGLE_CATEGORY_MAX_AREA constraint if
    ``category_area_crop``); if INPUT.COLOR_AUG_SSD the SSD colour jitter; the flip.
    ``style="lsj"``: flip, ResizeScale(MIN_SCALE, MAX_SCALE, IMAGE_SIZE), FixedSizeCrop(IMAGE_SIZE).
    At inference: ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST).
    """
    inp = cfg.INPUT
    if not is_train:
        return [T.ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST, "choice")]
    if style == "lsj":
        size = int(inp.IMAGE_SIZE)
        return _flip(cfg) + [
            T.ResizeScale(inp.MIN_SCALE, inp.MAX_SCALE, size, size),
            T.FixedSizeCrop((size, size)),
        ]
    if style != "resize_crop":
        raise ValueError(f"unknown augmentation style {style!r}")
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)
    ]
    if inp.CROP.ENABLED:
        if category_area_crop:
            augs.append(T.RandomCropCategoryAreaConstraint(
                inp.CROP.TYPE, inp.CROP.SIZE, inp.CROP.get("SINGLE_CATEGORY_MAX_AREA", 1.0),
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            ))
        else:
            augs.append(T.RandomCrop(inp.CROP.TYPE, inp.CROP.SIZE))
    if inp.get("COLOR_AUG_SSD", False):
        augs.append(T.ColorAugSSD(inp.FORMAT))
    return augs + _flip(cfg)


def _ignore_label(cfg) -> int:
    default = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    if cfg.DATASETS.TRAIN:
        return int(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", default))
    return int(default)


def _make(cfg, is_train, name, task, style, **kw) -> MaskFormerMapper:
    return MaskFormerMapper(
        is_train,
        augmentations=build_augmentations(cfg, is_train, style,
                                          category_area_crop=(task != "instance")),
        image_format=cfg.INPUT.FORMAT,
        task=task,
        ignore_label=_ignore_label(cfg),
        size_divisibility=cfg.INPUT.get("SIZE_DIVISIBILITY", -1),
        name=name,
        **kw,
    )


@register_mapper("mask_former_semantic")
def _semantic(cfg, is_train=True):
    return _make(cfg, is_train, "mask_former_semantic", "semantic", "resize_crop")


@register_mapper("mask_former_panoptic")
def _panoptic(cfg, is_train=True):
    return _make(cfg, is_train, "mask_former_panoptic", "panoptic", "resize_crop")


@register_mapper("mask_former_instance")
def _instance(cfg, is_train=True):
    return _make(cfg, is_train, "mask_former_instance", "instance", "resize_crop")


@register_mapper("coco_panoptic_lsj")
def _panoptic_lsj(cfg, is_train=True):
    return _make(cfg, is_train, "coco_panoptic_lsj", "panoptic", "lsj", with_boxes=True)


@register_mapper("coco_instance_lsj")
def _instance_lsj(cfg, is_train=True):
    return _make(cfg, is_train, "coco_instance_lsj", "instance", "lsj",
                 filter_empty_instances=True, with_boxes=True)


def build_mapper(cfg, is_train: bool = True) -> MaskFormerMapper:
    """The mapper named by INPUT.DATASET_MAPPER_NAME (training or inference variant)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    try:
        fn = MAPPER_REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a known dataset mapper; "
            f"known: {sorted(MAPPER_REGISTRY)}"
        ) from None
    return fn(cfg, is_train)
