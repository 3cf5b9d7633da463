"""The demo's inputs and output names: image paths from folders and globs, where each result goes,
and lazy batching.

* :func:`expand_inputs`: glob patterns and folders -> image paths (sorted, de-duplicated).
* :func:`output_paths` / :func:`video_output_path`: ``<output>/<input base name>.png`` (``_1``,
  ``_2`` ... on clashes) or ``<output>/<name>.mp4``, or ``output`` itself when it names a file.
* :func:`readable_images`: (path, output path, (H, W, 3) uint8 BGR image) of each input that can
  be read (with :func:`mask2former.data.image_io.read_image_8bit`); the others are reported.
* :func:`batched`: lists of ``size`` items, read lazily (frames are streamed, never accumulated).
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from ..data.image_io import read_image_8bit

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "is_image_file_name", "expand_inputs", "output_paths",
           "video_output_path", "readable_images", "batched"]

logger = logging.getLogger("mask2former.demo")
T = TypeVar("T")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov")


def is_image_file_name(path: str) -> bool:
    return not os.path.isdir(path) and path.lower().endswith(IMAGE_EXTS)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Paths named by ``patterns``: glob patterns expanded (sorted), folders replaced by the image
    files directly in them (sorted), duplicates dropped. A plain path that does not exist is kept,
    so that it is reported as unreadable."""
    paths: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                           if n.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(pattern, n)))
            if not found:
                logger.warning("no image file (%s) in folder %r", "/".join(IMAGE_EXTS), pattern)
            paths.extend(found)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                logger.warning("no file matches %r", pattern)
            paths.extend(m for m in matches if not os.path.isdir(m))
        else:
            paths.append(pattern)
    return list(dict.fromkeys(paths))


def output_paths(output: str, inputs: Sequence[str]) -> List[str]:
    """Where each input's visualisation goes: ``output`` itself for a single input when it names an
    image file, else ``output/<base name>.png`` (``_1``, ``_2`` ... appended on name clashes)."""
    if len(inputs) == 1 and is_image_file_name(output):
        return [output]
    used, paths = set(), []
    for path in inputs:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = stem, 0
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        paths.append(os.path.join(output, name + ".png"))
    return paths


def video_output_path(output: str, source_name: str) -> str:
    """``output`` when it names a video file, else ``output/<source base name>.mp4``."""
    if not os.path.isdir(output) and output.lower().endswith(VIDEO_EXTS):
        return output
    return os.path.join(output, os.path.splitext(os.path.basename(source_name))[0] + ".mp4")


def readable_images(inputs: Sequence[str], out_paths: Sequence[Optional[str]],
                    skipped: List[str]) -> Iterator[Tuple[str, Optional[str], np.ndarray]]:
    """(path, output path, BGR image) of each input that can be read, one at a time; the others
    are reported and appended to ``skipped``."""
    for path, out_path in zip(inputs, out_paths):
        if out_path is not None and os.path.exists(out_path) and os.path.samefile(path, out_path):
            logger.error("skipping %s: its visualisation would overwrite it; give another --output", path)
            skipped.append(path)
            continue
        try:
            image = read_image_8bit(path, "BGR")
        except OSError as e:
            logger.error("skipping %s: %s", path, e)
            skipped.append(path)
            continue
        yield path, out_path, image


def batched(items: Iterable[T], size: int) -> Iterator[List[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    batch: List[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
