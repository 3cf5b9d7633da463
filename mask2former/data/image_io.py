"""Reading images and label maps: one reader for datasets, evaluation, the demo and tools.

Every reader decodes the whole file at once (so truncated data fails here, not later), applies the
EXIF orientation, and reports problems as :class:`BadSampleError` naming the file and a reason
(the training loader skips and counts such samples; :func:`read_image_8bit` turns them into
``OSError`` for user-facing tools).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "BadSampleError",
    "MISSING_FILE",
    "CORRUPT_FILE",
    "SIZE_MISMATCH",
    "BAD_ANNOTATION",
    "FEW_LABELLED_PIXELS",
    "open_image",
    "read_image_size",
    "read_image",
    "read_label_map",
    "read_image_8bit",
]

# Reasons used by BadSampleError (the keys of mask2former.data.build.skipped_samples()).
MISSING_FILE = "missing_file"
CORRUPT_FILE = "corrupt_file"
SIZE_MISMATCH = "size_mismatch"
BAD_ANNOTATION = "bad_annotation"
# not a bad file: a training sample a mapper rejects as it comes out of its random augmentation
# (kMaX: no segment, or too few labelled pixels), drawn again; its entry is not counted as bad
FEW_LABELLED_PIXELS = "few_labelled_pixels"


class BadSampleError(Exception):
    """A sample that cannot be used: ``file`` is the offending file, ``reason`` one of
    "missing_file", "corrupt_file", "size_mismatch", "bad_annotation", "few_labelled_pixels";
    ``detail`` says more.
    ``index``: the dataset index of the entry ``file`` belongs to when that is not the entry being
    mapped (kMaX's copy-paste reads a second one); None when it is."""

    def __init__(self, file: str, reason: str, detail: str = "", index: Optional[int] = None):
        self.file = str(file)
        self.reason = reason
        self.detail = detail
        self.index = None if index is None else int(index)
        super().__init__(file, reason, detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.file}" + (f" ({self.detail})" if self.detail else "")

    def __reduce__(self):  # keep every field when sent from a DataLoader worker
        return (type(self), (self.file, self.reason, self.detail, self.index))


def open_image(file_name: str) -> Image.Image:
    """The decoded PIL image, upright per its EXIF orientation (kept as stored when the EXIF
    data is malformed)."""
    if not os.path.isfile(file_name):
        raise BadSampleError(file_name, MISSING_FILE, "no such file")
    try:
        img = Image.open(file_name)
        img.load()  # decode now, so that truncated / corrupt data fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise BadSampleError(file_name, CORRUPT_FILE, f"{type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: use the pixels as stored
        pass
    return img


def read_image_size(file_name: str) -> Tuple[int, int]:
    """``(height, width)`` of the upright image, from its header only (nothing is decoded)."""
    if not os.path.isfile(file_name):
        raise BadSampleError(file_name, MISSING_FILE, "no such file")
    try:
        with Image.open(file_name) as img:
            w, h = img.size
            try:
                if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations turned by 90 degrees
                    w, h = h, w
            except Exception:  # malformed EXIF: the size as stored, as open_image does
                pass
    except Exception as e:
        raise BadSampleError(file_name, CORRUPT_FILE, f"{type(e).__name__}: {e}") from None
    return h, w


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """An image as an HWC uint8 array (datasets' reader).

    ``format``: "BGR" or "RGB" (3 channels in that order), "L" (1 channel), any other PIL mode,
    or None (the array as stored, e.g. a label PNG of mode L / P / I;16 -> (H, W)).
    """
    img = open_image(file_name)
    try:
        if format is None:
            return np.asarray(img)
        if format in ("BGR", "RGB"):
            arr = np.asarray(img.convert("RGB"))
            return np.ascontiguousarray(arr[:, :, ::-1]) if format == "BGR" else arr
        arr = np.asarray(img.convert(format))
        return arr[:, :, None] if arr.ndim == 2 else arr
    except Exception as e:
        raise BadSampleError(file_name, CORRUPT_FILE, f"{type(e).__name__}: {e}") from None


def read_label_map(file_name: str) -> np.ndarray:
    """A single-channel label PNG (uint8 / uint16 / int32 / palette indices) as (H, W)."""
    arr = read_image(file_name, None)
    if arr.ndim != 2:
        raise BadSampleError(file_name, BAD_ANNOTATION,
                             f"expected a single-channel label map, got shape {arr.shape}")
    return arr


def read_image_8bit(path: str, format: str = "BGR") -> np.ndarray:
    """Any photo as (H, W, 3) uint8 in ``format`` ("BGR" or "RGB"), upright: grayscale is
    replicated to 3 channels, alpha dropped, palettes expanded, and 16-bit or float images
    scaled to 8 bits (PIL's own conversion would clip them). Raises OSError naming the file."""
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format must be 'BGR' or 'RGB', got {format!r}")
    try:
        img = open_image(path)
    except BadSampleError as e:
        raise OSError(f"cannot read {path!r} as an image ({e.reason.replace('_', ' ')}: {e.detail})") from None
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1]) if format == "BGR" else rgb
