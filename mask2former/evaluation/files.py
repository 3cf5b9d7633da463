"""Writing prediction files: shared by the evaluators and the demo's exporters.

* :func:`write_json` writes JSON that may hold numpy values; :func:`write_image` an image file
  whose format follows the extension; both through the package's atomic writer
  (``utils.file_io.atomic_write``, re-exported here), so an interrupted run never leaves a
  partial file.
* :func:`encode_image` and :func:`panoptic_png` give the encoded bytes: images are (H, W) or
  (H, W, 3) BGR arrays as OpenCV takes them, panoptic PNGs hold segment ids as
  ``R + 256 G + 256^2 B`` (COCO panoptic format).
"""
from __future__ import annotations

import json
import os
from typing import Any

import cv2
import numpy as np

from ..data.ids import id2rgb
from ..utils.file_io import atomic_write
from ..utils.results import to_jsonable

__all__ = ["atomic_write", "write_json", "write_image", "encode_image", "panoptic_png"]


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> str:
    """``json.dump(obj)`` into ``path`` atomically (numpy scalars become Python numbers); returns
    ``path``."""
    atomic_write(path, json.dumps(to_jsonable(obj), **dump_kwargs))
    return path


def encode_image(image: np.ndarray, ext: str = ".png") -> bytes:
    """The bytes of ``image`` ((H, W) or (H, W, 3) BGR; uint16 for 16-bit PNGs) in the format of
    ``ext``; OSError when OpenCV cannot encode it."""
    try:
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(image))
    except cv2.error as e:
        raise OSError(f"cannot encode a {image.dtype} image of shape {image.shape} as {ext}: {e.msg.strip()}") from None
    if not ok:
        raise OSError(f"cannot encode a {image.dtype} image of shape {image.shape} as {ext}")
    return buf.tobytes()


def write_image(path: str, image: np.ndarray) -> str:
    """Write ``image`` (see :func:`encode_image`) to ``path`` atomically, in the format its
    extension names (PNG without one); returns ``path``, OSError naming it when that fails."""
    try:
        atomic_write(path, encode_image(image, os.path.splitext(path)[1] or ".png"))
    except OSError as e:
        raise OSError(f"could not write {path!r}: {e.strerror or e}") from None
    return path


def panoptic_png(id_map: np.ndarray) -> bytes:
    """COCO panoptic PNG bytes of an (H, W) map of segment ids in [0, 256^3)."""
    return encode_image(id2rgb(id_map)[:, :, ::-1])
