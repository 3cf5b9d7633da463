"""Writing prediction files: shared by the evaluators and the demo's exporters.

* :func:`atomic_write` replaces a file by complete new content (a temporary file in the same
  folder, then ``os.replace``), so an interrupted run never leaves a partial file.
* :func:`write_json` writes JSON that may hold numpy scalars; :func:`write_image` an image file
  whose format follows the extension; both through :func:`atomic_write`.
* :func:`encode_image` and :func:`panoptic_png` give the encoded bytes: images are (H, W) or
  (H, W, 3) BGR arrays as OpenCV takes them, panoptic PNGs hold segment ids as
  ``R + 256 G + 256^2 B`` (COCO panoptic format).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Union

import cv2
import numpy as np

from ..data.ids import id2rgb

__all__ = ["atomic_write", "write_json", "write_image", "encode_image", "panoptic_png"]


def atomic_write(path: str, content: Union[bytes, str]) -> None:
    """Replace ``path`` by a file holding ``content`` (str is written as UTF-8)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # same folder, so that os.replace is a rename on one file system
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the outputs private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> str:
    """``json.dump(obj)`` into ``path`` atomically (numpy scalars become Python numbers); returns
    ``path``."""
    atomic_write(path, json.dumps(obj, default=_json_default, **dump_kwargs))
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
