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
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from fvcore.transforms.transform import (
    CropTransform,
    HFlipTransform,
    NoOpTransform,
    PadTransform,
    Transform,
    TransformList,
    VFlipTransform,
)
from PIL import Image

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

RNG = np.random.Generator


# --------------------------------------------------------------------------- #
# Deterministic transforms
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# Random policies
# --------------------------------------------------------------------------- #
class AugInput:
    """What augmentations look at: the image and, optionally, a semantic label map.

    ``sem_seg`` is transformed along with the image (nearest, padded with ``sem_seg_pad``) so
    that later augmentations (the category-area crop) see the current labels.
    """

    def __init__(self, image: np.ndarray, sem_seg: Optional[np.ndarray] = None,
                 sem_seg_pad: int = 255):
        self.image = image
        self.sem_seg = sem_seg
        self.sem_seg_pad = sem_seg_pad

    def transform(self, tfm: Transform) -> None:
        self.image = tfm.apply_image(self.image)
        if self.sem_seg is not None:
            self.sem_seg = apply_segmentation(tfm, self.sem_seg, self.sem_seg_pad)


class Augmentation:
    """A random policy: ``get_transform(aug_input, rng) -> Transform``.

    Subclasses draw every random number from ``rng`` (a ``numpy.random.Generator``).
    """

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def apply_augmentations(
    augmentations: Sequence[Union[Augmentation, Transform]],
    aug_input: AugInput,
    rng: Optional[RNG] = None,
) -> TransformList:
    """Run ``augmentations`` in order on ``aug_input`` (modified in place).

    Plain Transforms in the list are applied as they are. Returns the composed transform, to be
    applied to the remaining targets.
    """
    if rng is None:
        rng = np.random.default_rng()
    done: List[Transform] = []
    for aug in augmentations:
        tfm = aug if isinstance(aug, Transform) else aug.get_transform(aug_input, rng)
        aug_input.transform(tfm)
        done.append(tfm)
    return TransformList(done)


class ResizeShortestEdge(Augmentation):
    """Resize so that the shorter side becomes ``short_edge_length`` (keeping the aspect ratio),
    unless the longer side would then exceed ``max_size``; in that case the longer side
    becomes ``max_size``.

    ``sample_style="choice"``: the length is drawn from the list ``short_edge_length``;
    ``"range"``: it is drawn uniformly from the integers in ``[lo, hi]``. A drawn length of 0
    disables the resize.
    """

    def __init__(self, short_edge_length, max_size: int = sys.maxsize,
                 sample_style: str = "range", interp: str = "bilinear"):
        if sample_style not in ("range", "choice"):
            raise ValueError(f"sample_style must be 'range' or 'choice', got {sample_style!r}")
        if isinstance(short_edge_length, (int, np.integer)):
            short_edge_length = (int(short_edge_length), int(short_edge_length))
        short_edge_length = tuple(int(s) for s in short_edge_length)
        if sample_style == "range" and len(short_edge_length) != 2:
            raise ValueError(
                "short_edge_length must be (min, max) with sample_style='range'; got "
                f"{short_edge_length}"
            )
        if not short_edge_length:
            raise ValueError("short_edge_length is empty")
        self.short_edge_length = short_edge_length
        self.max_size = int(max_size) if max_size and max_size > 0 else sys.maxsize
        self.sample_style = sample_style
        self.interp = interp

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        h, w = aug_input.image.shape[:2]
        if self.sample_style == "range":
            size = int(rng.integers(self.short_edge_length[0], self.short_edge_length[1] + 1))
        else:
            size = int(self.short_edge_length[int(rng.integers(len(self.short_edge_length)))])
        if size == 0:
            return NoOpTransform()
        new_h, new_w = self.get_output_shape(h, w, size, self.max_size)
        return ResizeTransform(h, w, new_h, new_w, self.interp)

    @staticmethod
    def get_output_shape(h: int, w: int, short_edge_length: int, max_size: int) -> Tuple[int, int]:
        scale = short_edge_length / min(h, w)
        new_h, new_w = h * scale, w * scale
        longest = max(new_h, new_w)
        if longest > max_size:
            new_h, new_w = new_h * max_size / longest, new_w * max_size / longest
        return int(new_h + 0.5), int(new_w + 0.5)


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


class RandomFlip(Augmentation):
    """Flip horizontally (or vertically) with probability ``prob``."""

    def __init__(self, prob: float = 0.5, *, horizontal: bool = True, vertical: bool = False):
        if horizontal == vertical:
            raise ValueError("RandomFlip needs exactly one of horizontal / vertical")
        self.prob = float(prob)
        self.horizontal = horizontal
        self.vertical = vertical

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        h, w = aug_input.image.shape[:2]
        if rng.random() < self.prob:
            return HFlipTransform(w) if self.horizontal else VFlipTransform(h)
        return NoOpTransform()


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


class ColorAugSSD(Augmentation):
    """Random SSD photometric distortion (INPUT.COLOR_AUG_SSD).

    Each of brightness (delta in ``[-brightness_delta, brightness_delta]``), contrast (factor in
    ``[contrast_low, contrast_high]``), saturation (factor in ``[saturation_low,
    saturation_high]``) and hue (integer shift in ``[-hue_delta, hue_delta]``) is applied with
    probability 1/2; the order (contrast before or after saturation/hue) is a coin flip.
    ``img_format`` is INPUT.FORMAT (channel order of the image: "BGR" or "RGB").
    """

    def __init__(self, img_format: str, brightness_delta: float = 32, contrast_low: float = 0.5,
                 contrast_high: float = 1.5, saturation_low: float = 0.5,
                 saturation_high: float = 1.5, hue_delta: int = 18):
        if img_format not in ("BGR", "RGB"):
            raise ValueError(f"ColorAugSSD supports INPUT.FORMAT BGR or RGB, got {img_format!r}")
        self.img_format = img_format
        self.brightness_delta = brightness_delta
        self.contrast_low, self.contrast_high = contrast_low, contrast_high
        self.saturation_low, self.saturation_high = saturation_low, saturation_high
        self.hue_delta = int(hue_delta)

    def get_transform(self, aug_input: AugInput, rng: RNG) -> Transform:
        def maybe(draw):
            return draw() if rng.random() < 0.5 else None

        brightness = maybe(lambda: float(rng.uniform(-self.brightness_delta, self.brightness_delta)))
        contrast_first = bool(rng.random() < 0.5)
        contrast = maybe(lambda: float(rng.uniform(self.contrast_low, self.contrast_high)))
        saturation = maybe(lambda: float(rng.uniform(self.saturation_low, self.saturation_high)))
        hue = maybe(lambda: int(rng.integers(-self.hue_delta, self.hue_delta + 1)))
        return ColorAugSSDTransform(self.img_format, brightness, contrast, saturation, hue,
                                    contrast_first)


def resize_shortest_edge(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Output size ``(newh, neww)`` for resizing an ``h x w`` image so that its short side is
    ``short`` and its long side is at most ``max_size`` (``ResizeShortestEdge``'s rule, rounded
    half up). ``short <= 0`` means no resizing and ``max_size <= 0`` no limit on the long side."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive; got {h}x{w}")
    if short <= 0:
        return int(h), int(w)
    return ResizeShortestEdge.get_output_shape(int(h), int(w), int(short), max_size if max_size > 0 else sys.maxsize)


def resize_image(image: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """Bilinear resize of an ``(H, W, C)`` uint8 image (PIL, as Detectron2 does for uint8): the
    test-time resize."""
    h, w = image.shape[:2]
    return ResizeTransform(h, w, newh, neww, "bilinear").apply_image(image)
