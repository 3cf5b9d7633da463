"""Dataset mappers: dataset dict -> training / inference sample.

The official code has five near-identical mapper classes; here there is one core,
:class:`MaskFormerMapper`, and the official ``INPUT.DATASET_MAPPER_NAME`` values are thin
configurations of it, registered in :data:`MAPPER_REGISTRY` (``DATASET_MAPPER_REGISTRY`` of
:mod:`mask2former.utils.registry`) under the official names and importable under the official
class names (each built as ``Cls(cfg, is_train=True)``):

=============================  ====================================  ========  ===========
name                           class                                 targets   style
=============================  ====================================  ========  ===========
``mask_former_semantic``       MaskFormerSemanticDatasetMapper       semantic  resize_crop
``mask_former_panoptic``       MaskFormerPanopticDatasetMapper       panoptic  resize_crop
``mask_former_instance``       MaskFormerInstanceDatasetMapper       instance  resize_crop
``coco_panoptic_lsj``          COCOPanopticNewBaselineDatasetMapper  panoptic  lsj
``coco_instance_lsj``          COCOInstanceNewBaselineDatasetMapper  instance  lsj
``coco_panoptic_kmaxdeeplab``  PanoptickMaXDeepLabDatasetMapper      panoptic  kmax
=============================  ====================================  ========  ===========

(A kMaX-DeepLab model also reads its configs' ``coco_panoptic_lsj``,
``ade20k_panoptic_lsj`` and ``cityscapes_panoptic_lsj`` as this one, as its training script does.)

Training augmentations (:func:`build_augmentations`): ``resize_crop`` is ResizeShortestEdge,
[crop: the category-area crop for semantic / panoptic, a plain crop for instance], [SSD colour],
flip; ``lsj`` is flip, ResizeScale, FixedSizeCrop (INPUT.IMAGE_SIZE); ``kmax`` is ResizeScale, SSD
colour, a random crop of at most INPUT.IMAGE_SIZE, flip.

A mapper of one's own: ``@register_mapper("my_mapper")`` on a class or function called as
``fn(cfg, is_train)``, then ``INPUT.DATASET_MAPPER_NAME: my_mapper``; :func:`build_mapper` (and
so the loaders' default mapper) raises ``KeyError`` listing the registered names for an unknown
name.

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

Where things live: :mod:`.core` (``MaskFormerMapper``), :mod:`.targets` (masks from semantic /
panoptic PNGs, polygons and RLE; padding; boxes), :mod:`.official` (the five configurations,
``build_augmentations``, ``register_mapper``, ``build_mapper``). The readers and
``BadSampleError`` live in :mod:`mask2former.data.image_io` and ``rgb2id`` in
:mod:`mask2former.data.ids`; they stay importable from here.
"""
from ..ids import rgb2id  # noqa: F401  (lives in data/ids.py)
from ..image_io import (  # noqa: F401  (live in data/image_io.py)
    BAD_ANNOTATION,
    CORRUPT_FILE,
    MISSING_FILE,
    SIZE_MISMATCH,
    BadSampleError,
    open_image,
    read_image,
    read_label_map,
)
from . import official
from .core import TASKS, MaskFormerMapper  # noqa: F401  (TASKS was defined here)
from .official import (
    MAPPER_REGISTRY,
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    PanoptickMaXDeepLabDatasetMapper,
    build_augmentations,
    build_mapper,
    register_mapper,
)

__all__ = ["BadSampleError", "MaskFormerMapper", "read_image", "read_label_map", "rgb2id"]
__all__ += official.__all__
