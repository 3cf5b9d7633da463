"""Random policies (augmentations) and the list runner.

An :class:`Augmentation` looks at the current :class:`AugInput` (image, optional semantic map),
draws its parameters from an explicit ``numpy.random.Generator`` and returns a deterministic
Transform; :func:`apply_augmentations` runs a list of them and returns the composed
``TransformList``. This module holds the base classes and the resize / flip / colour policies of
the MaskFormer mappers; the crops and the large-scale-jitter resize are in
:mod:`~mask2former.data.transforms.crops`.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from fvcore.transforms.transform import (
    HFlipTransform,
    NoOpTransform,
    Transform,
    TransformList,
    VFlipTransform,
)

from .deterministic import ColorAugSSDTransform, ResizeTransform, apply_segmentation

__all__ = [
    "RNG",
    "AugInput",
    "Augmentation",
    "apply_augmentations",
    "ResizeShortestEdge",
    "RandomFlip",
    "ColorAugSSD",
    "resize_shortest_edge",
]

RNG = np.random.Generator


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
