"""Dataset mappers: dataset dict -> training / inference sample.

The official code has five near-identical mapper classes; here there is one core,
:class:`MaskFormerMapper`, and the official ``INPUT.DATASET_MAPPER_NAME`` values are thin
configurations of it, registered in :data:`MAPPER_REGISTRY` (``DATASET_MAPPER_REGISTRY`` of
:mod:`mask2former.utils.registry`) under the official names and importable under the official
class names (each built as ``Cls(cfg, is_train=True)``):

=============================  ====================================  ========  ===========  ==========
name                           class                                 targets   style        copy-paste
=============================  ====================================  ========  ===========  ==========
``mask_former_semantic``       MaskFormerSemanticDatasetMapper       semantic  resize_crop  no
``mask_former_panoptic``       MaskFormerPanopticDatasetMapper       panoptic  resize_crop  no
``mask_former_instance``       MaskFormerInstanceDatasetMapper       instance  resize_crop  no
``coco_panoptic_lsj``          COCOPanopticNewBaselineDatasetMapper  panoptic  lsj          no
``coco_instance_lsj``          COCOInstanceNewBaselineDatasetMapper  instance  lsj          no
``coco_panoptic_kmaxdeeplab``  PanoptickMaXDeepLabDatasetMapper      panoptic  kmax         yes
=============================  ====================================  ========  ===========  ==========

(A kMaX-DeepLab model also reads its configs' ``coco_panoptic_lsj``,
``ade20k_panoptic_lsj`` and ``cityscapes_panoptic_lsj`` as this one, as its training script does.)

Copy-paste (kMaX-DeepLab's, :mod:`.copy_paste`; in training, unless MODEL.KMAX_DEEPLAB.COPY_PASTE is
False): each sample gets the thing segments and a random subset of the stuff segments of a second
training image (drawn from the loader's dataset list, augmented with the scale range halved)
pasted on it; the sample then also carries ``is_real_pixels`` (bool (H, W): the first image and
the pasted pixels), and its image, targets and ``sem_seg`` span both images.

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
:class:`BadSampleError`; the training loader skips such samples and counts them (a bad
copy-paste second image: that entry is counted and the sample mapped again with new draws).
Configuration problems (e.g. a semantic mapper on a dict without ``sem_seg_file_name``) raise
``ValueError``.

Randomness: ``mapper(dataset_dict, rng=generator)`` draws every random number from ``rng``
(``numpy.random.Generator``; the copy-paste's second image and subset too); the training loader
passes one derived from (seed, stream position). Without ``rng`` a generator seeded from numpy's
global RNG is used.

Where things live: :mod:`.core` (``MaskFormerMapper``), :mod:`.targets` (masks from semantic /
panoptic PNGs, polygons and RLE; padding; boxes), :mod:`.official` (the six configurations,
``build_augmentations``, ``register_mapper``, ``build_mapper``), :mod:`.copy_paste` (kMaX's
copy-paste). The readers and
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
from .copy_paste import CopyPaste  # noqa: F401
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

__all__ = ["BadSampleError", "CopyPaste", "MaskFormerMapper", "read_image", "read_label_map", "rgb2id"]
__all__ += official.__all__
