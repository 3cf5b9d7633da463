"""The official mapper names as configurations of :class:`~.core.MaskFormerMapper`, and the registry.

Each official class fixes a task and an augmentation style and is registered in
:data:`~mask2former.utils.registry.DATASET_MAPPER_REGISTRY` under its INPUT.DATASET_MAPPER_NAME.
Like the official classes they are built either from a config, ``Cls(cfg, is_train=True)``, or
from keywords, ``Cls(is_train, augmentations=[...], image_format="RGB", ignore_label=255,
size_divisibility=-1)``. :func:`build_augmentations` is the config -> augmentation list rule they
share; :func:`build_mapper` picks the registered entry named by INPUT.DATASET_MAPPER_NAME.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from ...config.config import image_size_hw
from ...config.configurable import configurable
from ...utils.registry import DATASET_MAPPER_REGISTRY
from .. import transforms as T
from ..catalog import MetadataCatalog
from ..image_io import FEW_LABELLED_PIXELS, BadSampleError
from .copy_paste import CopyPaste
from .core import MaskFormerMapper

__all__ = [
    "MAPPER_REGISTRY",
    "register_mapper",
    "build_mapper",
    "build_augmentations",
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "COCOInstanceNewBaselineDatasetMapper",
    "PanoptickMaXDeepLabDatasetMapper",
    "KMAX_MAPPER_NAMES",
]

MAPPER_REGISTRY = DATASET_MAPPER_REGISTRY  # the name this package has always used


def register_mapper(name: str):
    """Decorator: register ``fn(cfg, is_train) -> mapper`` (a function or a class) under the
    INPUT.DATASET_MAPPER_NAME value ``name``; a name that is taken raises ``KeyError``."""
    return MAPPER_REGISTRY.register(name=name)


# kMaX-DeepLab's training script maps these INPUT.DATASET_MAPPER_NAME values of its configs to
# its own mapper; with MODEL.META_ARCHITECTURE kMaXDeepLab they mean the same here
KMAX_MAPPER_NAMES = ("coco_panoptic_lsj", "ade20k_panoptic_lsj", "cityscapes_panoptic_lsj")


def build_mapper(cfg, is_train: bool = True):
    """The mapper named by INPUT.DATASET_MAPPER_NAME (training or inference variant); a kMaX-DeepLab
    model reads the names of :data:`KMAX_MAPPER_NAMES` as ``coco_panoptic_kmaxdeeplab``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name in KMAX_MAPPER_NAMES and cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab":
        name = PanoptickMaXDeepLabDatasetMapper.NAME
    if name not in MAPPER_REGISTRY:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a known dataset mapper; "
            f"known: {MAPPER_REGISTRY.names()} (add one with mask2former.data.register_mapper)"
        )
    return MAPPER_REGISTRY.get(name)(cfg, is_train)


def _flip(cfg) -> List[T.Augmentation]:
    mode = cfg.INPUT.RANDOM_FLIP
    if mode == "none":
        return []
    if mode not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {mode!r}")
    return [T.RandomFlip(horizontal=mode == "horizontal", vertical=mode == "vertical")]


def build_augmentations(cfg, is_train: bool, style: str = "resize_crop",
                        category_area_crop: bool = True, scale_ratio: float = 1.0) -> List[T.Augmentation]:
    """The augmentation list.

    ``style="resize_crop"`` (MaskFormer mappers): ResizeShortestEdge(MIN_SIZE_TRAIN,
    MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING); if INPUT.CROP.ENABLED a random crop
    (INPUT.CROP.TYPE/SIZE; with the SINGLE_CATEGORY_MAX_AREA constraint if
    ``category_area_crop``); if INPUT.COLOR_AUG_SSD the SSD colour jitter; the flip.
    ``style="lsj"``: flip, ResizeScale(MIN_SCALE, MAX_SCALE, IMAGE_SIZE), FixedSizeCrop(IMAGE_SIZE)
    (IMAGE_SIZE n is an n x n crop, [h, w] an h x w one).
    ``style="kmax"`` (kMaX-DeepLab): ResizeScale(MIN_SCALE, MAX_SCALE, IMAGE_SIZE), the SSD colour
    jitter, a random crop of at most IMAGE_SIZE (no padding: the model pads), the flip; both scales
    times ``scale_ratio`` (0.5 for the image kMaX's copy-paste takes its segments from).
    At inference: ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST).
    """
    inp = cfg.INPUT
    if scale_ratio != 1.0 and not (is_train and style == "kmax"):
        raise ValueError(f"scale_ratio applies to the training style 'kmax' only; got {scale_ratio} for "
                         f"style {style!r}, is_train={is_train}")
    if not is_train:
        return [T.ResizeShortestEdge(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST, "choice")]
    if style == "lsj":
        h, w = image_size_hw(inp.IMAGE_SIZE)  # n (Mask2Former) or [h, w] (kMaX-DeepLab)
        return _flip(cfg) + [
            T.ResizeScale(inp.MIN_SCALE, inp.MAX_SCALE, h, w),
            T.FixedSizeCrop((h, w)),
        ]
    if style == "kmax":
        h, w = image_size_hw(inp.IMAGE_SIZE)
        lo, hi = inp.MIN_SCALE * scale_ratio, inp.MAX_SCALE * scale_ratio
        return [T.ResizeScale(lo, hi, h, w), T.ColorAugSSD(inp.FORMAT),
                T.RandomCrop("absolute", (h, w))] + _flip(cfg)
    if style != "resize_crop":
        raise ValueError(f"unknown augmentation style {style!r}")
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)
    ]
    if inp.CROP.ENABLED:
        if category_area_crop:
            augs.append(T.RandomCropCategoryAreaConstraint(
                inp.CROP.TYPE, inp.CROP.SIZE, inp.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            ))
        else:
            augs.append(T.RandomCrop(inp.CROP.TYPE, inp.CROP.SIZE))
    if inp.COLOR_AUG_SSD:
        augs.append(T.ColorAugSSD(inp.FORMAT))
    return augs + _flip(cfg)


def _ignore_label(cfg) -> int:
    default = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    if cfg.DATASETS.TRAIN:
        return int(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", default))
    return int(default)


class _OfficialMapper(MaskFormerMapper):
    """A :class:`MaskFormerMapper` whose task, augmentation style and target options are fixed
    by the subclass (``NAME``: its INPUT.DATASET_MAPPER_NAME, ``TASK``, ``STYLE``, ``OPTIONS``)."""

    NAME = ""
    TASK = ""
    STYLE = "resize_crop"
    OPTIONS: dict = {}

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: Sequence[Any],
                 image_format: str = "BGR", ignore_label: int = 255, size_divisibility: int = -1):
        super().__init__(is_train, augmentations=augmentations, image_format=image_format,
                         task=self.TASK, ignore_label=ignore_label,
                         size_divisibility=size_divisibility, name=self.NAME, **self.OPTIONS)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, is_train, cls.STYLE,
                                                 category_area_crop=cls.TASK != "instance"),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": _ignore_label(cfg),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }


def _official(cls):
    return MAPPER_REGISTRY.register(cls, name=cls.NAME)


@_official
class MaskFormerSemanticDatasetMapper(_OfficialMapper):
    """``mask_former_semantic``: per-class masks of the semantic PNG; resize, category-area crop."""

    NAME, TASK = "mask_former_semantic", "semantic"


@_official
class MaskFormerPanopticDatasetMapper(_OfficialMapper):
    """``mask_former_panoptic``: per-segment masks of the panoptic PNG; as the semantic mapper."""

    NAME, TASK = "mask_former_panoptic", "panoptic"


@_official
class MaskFormerInstanceDatasetMapper(_OfficialMapper):
    """``mask_former_instance``: per-annotation masks (polygons / RLE); resize, plain crop."""

    NAME, TASK = "mask_former_instance", "instance"


@_official
class COCOPanopticNewBaselineDatasetMapper(_OfficialMapper):
    """``coco_panoptic_lsj``: panoptic targets with boxes; large-scale jitter."""

    NAME, TASK, STYLE = "coco_panoptic_lsj", "panoptic", "lsj"
    OPTIONS = {"with_boxes": True}


@_official
class COCOInstanceNewBaselineDatasetMapper(_OfficialMapper):
    """``coco_instance_lsj``: instance targets with boxes, emptied masks dropped; large-scale
    jitter."""

    NAME, TASK, STYLE = "coco_instance_lsj", "instance", "lsj"
    OPTIONS = {"filter_empty_instances": True, "with_boxes": True}


@_official
class PanoptickMaXDeepLabDatasetMapper(_OfficialMapper):
    """``coco_panoptic_kmaxdeeplab`` (and, for a kMaX-DeepLab model, :data:`KMAX_MAPPER_NAMES`):
    panoptic targets at the image's size; kMaX's large-scale jitter to IMAGE_SIZE (style "kmax").

    In training, with ``copy_paste`` (from the config: unless MODEL.KMAX_DEEPLAB.COPY_PASTE is
    False), segments of a second training image are pasted on each sample, as the official mapper
    always does (:mod:`.copy_paste`): the sample then also has ``is_real_pixels`` (bool (H, W)), and
    image, targets and ``sem_seg`` span both images. The second image comes from the training
    loader's dataset list (``needs_dataset`` / ``bind_dataset``) or ``CopyPaste(dataset=...)``.
    A training sample (after copy-paste) with no segment or at most ``min_labelled_pixels``
    labelled pixels (MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS, the official 4096) is rejected with
    :class:`BadSampleError` reason ``few_labelled_pixels``, which the training loader answers with
    another draw, as the official mapper draws another image.
    """

    NAME, TASK, STYLE = "coco_panoptic_kmaxdeeplab", "panoptic", "kmax"

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: Sequence[Any], image_format: str = "BGR",
                 ignore_label: int = 255, size_divisibility: int = -1, copy_paste: Optional[CopyPaste] = None,
                 min_labelled_pixels: int = 0):
        super().__init__(is_train, augmentations=augmentations, image_format=image_format,
                         ignore_label=ignore_label, size_divisibility=size_divisibility)
        self.min_labelled_pixels = int(min_labelled_pixels)
        if copy_paste is not None and (not is_train or self.size_divisibility > 0):
            raise ValueError("kMaX's copy-paste runs in training without mapper padding (the model pads); got "
                             f"is_train={is_train}, INPUT.SIZE_DIVISIBILITY={size_divisibility} (set it to -1, or "
                             "MODEL.KMAX_DEEPLAB.COPY_PASTE False)")
        self.copy_paste = copy_paste

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["min_labelled_pixels"] = cfg.MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS
        if is_train and cfg.MODEL.KMAX_DEEPLAB.COPY_PASTE:
            ret["copy_paste"] = CopyPaste(augmentations=build_augmentations(cfg, True, cls.STYLE, scale_ratio=0.5),
                                          image_format=cfg.INPUT.FORMAT, ignore_label=ret["ignore_label"])
        return ret

    @property
    def needs_dataset(self) -> bool:
        """Whether the copy-paste still needs the list to draw second images from."""
        return self.copy_paste is not None and not self.copy_paste.dataset

    def bind_dataset(self, dataset: Sequence[dict]) -> None:
        self.copy_paste.bind_dataset(dataset)

    def _map_train(self, d: dict, image, rng):
        out, tfm = super()._map_train(d, image, rng)
        if self.copy_paste is not None:
            out = self.copy_paste(out, d, rng)
        masks = out["instances"].gt_masks
        labelled = int(masks.sum())
        if len(masks) == 0 or labelled <= self.min_labelled_pixels:
            raise BadSampleError(d["file_name"], FEW_LABELLED_PIXELS,
                                 f"{len(masks)} segments, {labelled} labelled pixels after augmentation "
                                 f"(MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS {self.min_labelled_pixels}): drawn again")
        return out, tfm
