"""Data augmentations for training and inference.

Two layers, as in Detectron2:

* a :class:`~fvcore.transforms.transform.Transform` is a *deterministic* operation (resize
  this image from 480x640 to 800x1066, crop this window, flip). It knows how to apply itself to
  an image (``apply_image``), to a label map (``apply_segmentation``: nearest-neighbour, never
  mixes label values) and to point coordinates (``apply_coords``, used for polygons).
  fvcore provides ``CropTransform``, ``PadTransform``, ``HFlipTransform``,
  ``VFlipTransform``, ``NoOpTransform`` and ``TransformList``; this module adds
  :class:`ResizeTransform` (PIL bilinear for images, exact nearest-neighbour for label maps)
  and :class:`ColorAugSSDTransform`.
* an :class:`Augmentation` is a *random policy* that, given the current image (and optionally
  a semantic map), draws its parameters from an explicit ``numpy.random.Generator`` and
  returns a Transform. :func:`apply_augmentations` runs a list of them and returns the
  composed :class:`TransformList`, which is then applied to every other target (panoptic id
  maps, instance masks, polygons) so that image and targets stay aligned.

Randomness only ever comes from the ``rng`` argument; nothing here touches global RNG state.
This is what lets the training loader derive each sample's augmentation from
``(seed, position in the sample stream)`` and therefore resume exactly.

Padding: image pixels are padded with ``pad_value`` (128 by default). Label maps are padded
with a value chosen per map by the caller (see :func:`apply_segmentation`): the ignore label
for semantic maps, 0 (= VOID) for panoptic id maps, ``False`` for binary masks.

Where things live (every name is importable from ``mask2former.data.transforms``):

* :mod:`.deterministic`: ``ResizeTransform``, ``ColorAugSSDTransform``, ``apply_segmentation``,
  ``resize_nearest``, ``resize_image``;
* :mod:`.augmentation`: ``AugInput``, ``Augmentation``, ``apply_augmentations``,
  ``ResizeShortestEdge``, ``RandomFlip``, ``ColorAugSSD``, ``resize_shortest_edge``;
* :mod:`.crops`: ``RandomCrop``, ``RandomCropCategoryAreaConstraint``, ``ResizeScale``,
  ``FixedSizeCrop``.
"""
from fvcore.transforms.transform import (
    CropTransform,
    HFlipTransform,
    NoOpTransform,
    PadTransform,
    Transform,
    TransformList,
    VFlipTransform,
)

from .augmentation import (
    AugInput,
    Augmentation,
    ColorAugSSD,
    RandomFlip,
    ResizeShortestEdge,
    apply_augmentations,
    resize_shortest_edge,
)
from .crops import FixedSizeCrop, RandomCrop, RandomCropCategoryAreaConstraint, ResizeScale
from .deterministic import (
    ColorAugSSDTransform,
    ResizeTransform,
    apply_segmentation,
    resize_image,
    resize_nearest,
)

__all__ = [
    # deterministic transforms
    "Transform",
    "TransformList",
    "NoOpTransform",
    "CropTransform",
    "PadTransform",
    "HFlipTransform",
    "VFlipTransform",
    "ResizeTransform",
    "ColorAugSSDTransform",
    # random policies
    "Augmentation",
    "AugInput",
    "ResizeShortestEdge",
    "ResizeScale",
    "RandomFlip",
    "RandomCrop",
    "RandomCropCategoryAreaConstraint",
    "FixedSizeCrop",
    "ColorAugSSD",
    "apply_augmentations",
    "apply_segmentation",
    "resize_nearest",
    "resize_shortest_edge",
    "resize_image",
]
