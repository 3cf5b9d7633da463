"""Crops and the large-scale-jitter resize.

* :class:`RandomCrop` / :class:`RandomCropCategoryAreaConstraint`: the INPUT.CROP crops of the
  MaskFormer mappers (the latter avoids windows dominated by one category).
* :class:`ResizeScale` + :class:`FixedSizeCrop`: large-scale jitter (LSJ) of the COCO mappers
  (INPUT.MIN_SCALE / MAX_SCALE / IMAGE_SIZE), the crop padding up to its size.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from fvcore.transforms.transform import CropTransform, PadTransform, Transform, TransformList

from .augmentation import RNG, AugInput, Augmentation
from .deterministic import ResizeTransform

__all__ = ["ResizeScale", "RandomCrop", "RandomCropCategoryAreaConstraint", "FixedSizeCrop"]


class ResizeScale(Augmentation):
    """Large-scale jitter resize: draw ``s ~ U[min_scale, max_scale]`` and resize (keeping the
    aspect ratio) so that the image fits in ``(s * target_height, s * target_width)``."""

    def __init__(self, min_scale: float, max_scale: float, target_height: int, target_width: int,
                 interp: str = "bilinear"):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.target_height = int(target_height)
        self.target_width = int(target_width)
        self.interp = interp

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        h, w = aug_input.image.shape[:2]
        scale = float(rng.uniform(self.min_scale, self.max_scale))
        factor = min(self.target_height * scale / h, self.target_width * scale / w)
        new_h = max(int(np.round(h * factor)), 1)
        new_w = max(int(np.round(w * factor)), 1)
        return ResizeTransform(h, w, new_h, new_w, self.interp)


_CROP_TYPES = ("relative_range", "relative", "absolute", "absolute_range")


class RandomCrop(Augmentation):
    """Crop a random window whose size depends on ``crop_type`` (INPUT.CROP.TYPE):

    * ``"relative"``: ``(H * crop_size[0], W * crop_size[1])``;
    * ``"relative_range"``: relative, with the two fractions drawn uniformly from
      ``[crop_size[0], 1]`` and ``[crop_size[1], 1]``;
    * ``"absolute"``: ``(crop_size[0], crop_size[1])`` pixels, clipped to the image;
    * ``"absolute_range"``: height drawn from the integers in
      ``[min(H, crop_size[0]), min(H, crop_size[1])]``, width likewise with W.
    """

    def __init__(self, crop_type: str, crop_size: Sequence[float]):
        if crop_type not in _CROP_TYPES:
            raise ValueError(f"crop_type must be one of {_CROP_TYPES}, got {crop_type!r}")
        if len(crop_size) != 2:
            raise ValueError(f"crop_size must have two values, got {crop_size}")
        if crop_type == "absolute_range" and crop_size[0] > crop_size[1]:
            raise ValueError(f"absolute_range needs crop_size[0] <= crop_size[1], got {crop_size}")
        self.crop_type = crop_type
        self.crop_size = tuple(crop_size)

    def get_crop_size(self, h: int, w: int, rng: RNG) -> Tuple[int, int]:
        t, cs = self.crop_type, self.crop_size
        if t == "relative":
            return int(h * cs[0] + 0.5), int(w * cs[1] + 0.5)
        if t == "relative_range":
            lo = np.asarray(cs, dtype=np.float32)
            fh, fw = lo + rng.random(2) * (1 - lo)
            return int(h * fh + 0.5), int(w * fw + 0.5)
        if t == "absolute":
            return min(int(cs[0]), h), min(int(cs[1]), w)
        ch = int(rng.integers(min(h, int(cs[0])), min(h, int(cs[1])) + 1))
        cw = int(rng.integers(min(w, int(cs[0])), min(w, int(cs[1])) + 1))
        return ch, cw

    def _window(self, h: int, w: int, rng: RNG) -> Tuple[int, int, int, int]:
        ch, cw = self.get_crop_size(h, w, rng)
        ch, cw = max(min(ch, h), 1), max(min(cw, w), 1)
        y0 = int(rng.integers(h - ch + 1))
        x0 = int(rng.integers(w - cw + 1))
        return x0, y0, cw, ch

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        h, w = aug_input.image.shape[:2]
        x0, y0, cw, ch = self._window(h, w, rng)
        return CropTransform(x0, y0, cw, ch, w, h)


class RandomCropCategoryAreaConstraint(RandomCrop):
    """:class:`RandomCrop` that avoids windows dominated by one category.

    Up to 10 windows are drawn; the first one in which at least two categories are present and
    the largest one covers less than ``single_category_max_area`` of the labelled (not
    ``ignored_category``) pixels is used; if none qualifies, the 10th is used. Needs
    ``aug_input.sem_seg``; without it (or with ``single_category_max_area >= 1``) this is a
    plain random crop.
    """

    def __init__(self, crop_type: str, crop_size: Sequence[float],
                 single_category_max_area: float = 1.0, ignored_category: Optional[int] = None):
        super().__init__(crop_type, crop_size)
        self.single_category_max_area = float(single_category_max_area)
        self.ignored_category = ignored_category

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        sem = aug_input.sem_seg
        if self.single_category_max_area >= 1.0 or sem is None:
            return super().get_transform(aug_input, rng)
        h, w = sem.shape[:2]
        for _ in range(10):
            x0, y0, cw, ch = self._window(h, w, rng)
            labels, counts = np.unique(sem[y0:y0 + ch, x0:x0 + cw], return_counts=True)
            if self.ignored_category is not None:
                counts = counts[labels != self.ignored_category]
            if len(counts) > 1 and counts.max() < counts.sum() * self.single_category_max_area:
                break
        return CropTransform(x0, y0, cw, ch, w, h)


class FixedSizeCrop(Augmentation):
    """Crop a random ``crop_size = (height, width)`` window where the image is larger, then (if
    ``pad``) pad the bottom/right up to ``crop_size`` where it is smaller. Images are padded
    with ``pad_value``; label maps with ``seg_pad_value`` unless the caller chooses a fill per
    map (:func:`apply_segmentation`)."""

    def __init__(self, crop_size: Tuple[int, int], pad: bool = True, pad_value: float = 128.0,
                 seg_pad_value: int = 255):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.pad = pad
        self.pad_value = pad_value
        self.seg_pad_value = seg_pad_value

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        h, w = aug_input.image.shape[:2]
        th, tw = self.crop_size
        max_dy, max_dx = max(h - th, 0), max(w - tw, 0)
        u = float(rng.uniform(0.0, 1.0))  # one draw for both axes
        y0, x0 = int(np.round(max_dy * u)), int(np.round(max_dx * u))
        ch, cw = min(h, th), min(w, tw)
        tfms: List[Transform] = [CropTransform(x0, y0, cw, ch, w, h)]
        if self.pad and (ch < th or cw < tw):
            tfms.append(PadTransform(0, 0, tw - cw, th - ch, cw, ch, self.pad_value,
                                     self.seg_pad_value))
        return TransformList(tfms)
