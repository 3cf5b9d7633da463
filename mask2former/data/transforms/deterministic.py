"""Deterministic transforms: operations whose parameters are already fixed (resize this image from
480x640 to 800x1066, shift hue by 7).

Each applies itself to an image (``apply_image``), to a label map or mask stack (``apply_segmentation``:
nearest-neighbour, never mixes label values) and to point coordinates (``apply_coords``, for
polygons). fvcore provides the crop, pad, flip, no-op and list transforms; this module adds
:class:`ResizeTransform` (PIL for images, exact nearest-neighbour for label maps) and
:class:`ColorAugSSDTransform`, plus :func:`apply_segmentation` (a transform applied to a label map
with a per-map pad fill) and the test-time :func:`resize_image`.
"""
from __future__ import annotations

from typing import Optional, Union

import cv2
import numpy as np
from fvcore.transforms.transform import PadTransform, Transform, TransformList
from PIL import Image

__all__ = [
    "ResizeTransform",
    "ColorAugSSDTransform",
    "apply_segmentation",
    "resize_nearest",
    "resize_image",
]


def resize_nearest(arr: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``arr`` (any dtype, incl. bool).

    Output pixel ``(y, x)`` takes the input pixel that contains its centre, i.e. input row
    ``floor((y + 0.5) * h / new_h)`` -- the same sampling as PIL's ``NEAREST`` filter.
    """
    h, w = arr.shape[:2]
    if (h, w) == (new_h, new_w):
        return arr
    rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


_PIL_FILTERS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


class ResizeTransform(Transform):
    """Resize from ``(h, w)`` to ``(new_h, new_w)``.

    Images are resized with PIL (``interp``: "bilinear" by default; PIL filters antialias when
    shrinking), label maps and masks with exact nearest-neighbour sampling.
    """

    def __init__(self, h: int, w: int, new_h: int, new_w: int, interp: str = "bilinear"):
        super().__init__()
        if interp not in _PIL_FILTERS:
            raise ValueError(f"interp must be one of {sorted(_PIL_FILTERS)}, got {interp!r}")
        self._set_attributes(dict(h=int(h), w=int(w), new_h=int(new_h), new_w=int(new_w),
                                  interp=interp))

    def _check(self, arr: np.ndarray) -> None:
        if arr.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"ResizeTransform expects an input of size {(self.h, self.w)}, got {arr.shape[:2]}"
            )

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        self._check(img)
        if (self.h, self.w) == (self.new_h, self.new_w):
            return img
        if self.interp == "nearest":
            return resize_nearest(img, self.new_h, self.new_w)
        size = (self.new_w, self.new_h)
        flt = _PIL_FILTERS[self.interp]
        if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] in (1, 3, 4)):
            squeeze = img.ndim == 3 and img.shape[2] == 1
            pil = Image.fromarray(img[:, :, 0] if squeeze else img)
            out = np.asarray(pil.resize(size, flt))
            return out[:, :, None] if squeeze else out
        # Other dtypes / channel counts: resize each channel as a float32 image.
        chans = img[:, :, None] if img.ndim == 2 else img
        planes = [Image.fromarray(np.ascontiguousarray(chans[:, :, c], dtype=np.float32))
                  for c in range(chans.shape[2])]
        out = np.stack([np.asarray(p.resize(size, flt)) for p in planes], axis=2)
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            out = np.clip(np.round(out), info.min, info.max)
        out = out.astype(img.dtype)
        return out[:, :, 0] if img.ndim == 2 else out

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        self._check(segmentation)
        return resize_nearest(segmentation, self.new_h, self.new_w)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def inverse(self) -> "ResizeTransform":
        return ResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


def _to_uint8(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``img * alpha + beta`` clipped to [0, 255] and truncated to uint8 (as in SSD)."""
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


class ColorAugSSDTransform(Transform):
    """The photometric distortion of SSD (Liu et al., ECCV 2016) with fixed parameters.

    Operates on uint8 3-channel images; internally works in BGR order (OpenCV's HSV
    conversion), so RGB inputs are reordered before and after. The steps, each skipped when its
    parameter is None: brightness (add ``brightness``), then either contrast -> saturation ->
    hue or saturation -> hue -> contrast (``contrast_first``). Contrast multiplies all channels,
    saturation multiplies the HSV S channel, hue shifts the HSV H channel (0..179) cyclically.
    Label maps and coordinates are unchanged.
    """

    def __init__(
        self,
        img_format: str,
        brightness: Optional[float],
        contrast: Optional[float],
        saturation: Optional[float],
        hue: Optional[int],
        contrast_first: bool,
    ):
        super().__init__()
        if img_format not in ("BGR", "RGB"):
            raise ValueError(f"ColorAugSSD supports BGR or RGB images, got format {img_format!r}")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"ColorAugSSD expects a uint8 HxWx3 image, got {img.dtype} {img.shape}")
        rgb = self.img_format == "RGB"
        if rgb:
            img = img[:, :, ::-1]
        img = np.ascontiguousarray(img)
        if self.brightness is not None:
            img = _to_uint8(img, beta=self.brightness)
        if self.contrast_first:
            img = self._saturation_hue(self._contrast(img))
        else:
            img = self._contrast(self._saturation_hue(img))
        if rgb:
            img = np.ascontiguousarray(img[:, :, ::-1])
        return img

    def _contrast(self, img: np.ndarray) -> np.ndarray:
        return img if self.contrast is None else _to_uint8(img, alpha=self.contrast)

    def _saturation_hue(self, img: np.ndarray) -> np.ndarray:
        if self.saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = _to_uint8(hsv[:, :, 1], alpha=self.saturation)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if self.hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int64) + self.hue) % 180).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return img

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords


def apply_segmentation(tfm: Transform, seg: np.ndarray, pad_value: Union[int, float, bool]) -> np.ndarray:
    """Apply ``tfm`` to a label map / mask stack (H, W) or (H, W, C) with nearest sampling.

    Regions that a :class:`PadTransform` adds are filled with ``pad_value`` (fvcore's
    ``PadTransform`` has a single ``seg_pad_value``; targets need different fills).
    """
    tfms = tfm.transforms if isinstance(tfm, TransformList) else [tfm]
    for t in tfms:
        if isinstance(t, PadTransform):
            pad = [(t.y0, t.y1), (t.x0, t.x1)] + [(0, 0)] * (seg.ndim - 2)
            seg = np.pad(seg, pad, mode="constant", constant_values=pad_value)
        else:
            seg = t.apply_segmentation(seg)
    return seg


def resize_image(image: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """Bilinear resize of an ``(H, W, C)`` uint8 image (PIL, as Detectron2 does for uint8): the
    test-time resize."""
    h, w = image.shape[:2]
    return ResizeTransform(h, w, newh, neww, "bilinear").apply_image(image)
