"""Training targets of the mappers: per-segment masks and their classes, built from

* a semantic label map (H, W): one mask per label present, the ignore label excluded;
* a panoptic id map (H, W) (``rgb2id`` of the panoptic PNG) and ``segments_info``: one mask per
  non-crowd segment;
* COCO instance annotations: polygons (transformed as coordinates, then rasterised at the
  output size) or RLE / HxW arrays (full-image masks transformed like label maps).

Masks are bool arrays (N, H, W); classes are the dicts' category ids (contiguous after loading).
Malformed annotations raise :class:`~mask2former.data.image_io.BadSampleError`.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util

from .. import transforms as T
from ..image_io import BAD_ANNOTATION, SIZE_MISMATCH, BadSampleError

__all__ = [
    "check_same_size",
    "pad_to_multiple",
    "masks_to_boxes",
    "polygons_to_mask",
    "decode_rle",
    "instance_masks",
    "semantic_masks",
    "panoptic_masks",
    "non_crowd",
    "category_map",
]


def check_same_size(file_name: str, what: str, got: Tuple[int, int], expected: Tuple[int, int],
                    reference: str) -> None:
    """BadSampleError(SIZE_MISMATCH) naming ``file_name`` when ``got != expected`` ((H, W))."""
    if tuple(got) != tuple(expected):
        raise BadSampleError(
            file_name, SIZE_MISMATCH,
            f"{what} is {got[1]}x{got[0]} (WxH) but {reference} says {expected[1]}x{expected[0]}",
        )


def pad_to_multiple(arr: np.ndarray, size: Tuple[int, int], value) -> np.ndarray:
    """Pad the first two axes of ``arr`` at the bottom/right up to ``size``."""
    ph, pw = size[0] - arr.shape[0], size[1] - arr.shape[1]
    if ph == 0 and pw == 0:
        return arr
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant", constant_values=value)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) XYXY boxes (pixel extents; zeros for empty masks)."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        if len(ys) and len(xs):
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def polygons_to_mask(polygons: Sequence[Sequence[float]], tfm: T.Transform,
                     height: int, width: int) -> np.ndarray:
    """Transform polygon vertices with ``tfm`` and rasterise them at ``(height, width)``."""
    flat = []
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) < 3:
            continue
        pts = tfm.apply_coords(pts.copy())
        flat.append(pts.reshape(-1).tolist())
    if not flat:
        return np.zeros((height, width), dtype=bool)
    rle = mask_util.merge(mask_util.frPyObjects(flat, height, width))
    return mask_util.decode(rle).astype(bool)


def decode_rle(segm: dict, file_name: str, orig_size: Tuple[int, int]) -> np.ndarray:
    """A COCO RLE (compressed or uncompressed) as an (H, W) bool mask of the image's size."""
    try:
        h, w = (int(v) for v in segm["size"])
        if isinstance(segm["counts"], list):
            segm = mask_util.frPyObjects(segm, h, w)
        mask = mask_util.decode(segm)
    except Exception as e:
        raise BadSampleError(file_name, BAD_ANNOTATION, f"malformed RLE: {type(e).__name__}: {e}")
    check_same_size(file_name, "an RLE mask", mask.shape[:2], orig_size, "the image")
    return mask.astype(bool)


def instance_masks(annos: List[dict], tfm: T.Transform, file_name: str,
                   orig_size: Tuple[int, int], size: Tuple[int, int]) -> Tuple[List[int], np.ndarray]:
    """Classes and (N, H, W) masks at the augmented ``size`` of the annotations ``annos``."""
    classes, masks = [], []
    rle_idx, rle_masks = [], []
    for anno in annos:
        segm = anno.get("segmentation")
        classes.append(int(anno["category_id"]))
        if isinstance(segm, list):
            try:
                masks.append(polygons_to_mask(segm, tfm, *size))
            except Exception as e:
                raise BadSampleError(file_name, BAD_ANNOTATION,
                                     f"malformed polygon: {type(e).__name__}: {e}") from None
        elif isinstance(segm, dict):
            rle_idx.append(len(masks))
            rle_masks.append(decode_rle(segm, file_name, orig_size))
            masks.append(None)
        elif isinstance(segm, np.ndarray) and segm.ndim == 2:
            check_same_size(file_name, "a mask array", segm.shape, orig_size, "the image")
            rle_idx.append(len(masks))
            rle_masks.append(segm.astype(bool))
            masks.append(None)
        else:
            raise BadSampleError(
                file_name, BAD_ANNOTATION,
                f"unsupported segmentation of type {type(segm).__name__} (expected polygons, "
                "RLE dict or an HxW array)",
            )
    if rle_masks:  # transform all full-image masks at once, as an (H, W, K) stack
        stack = T.apply_segmentation(tfm, np.stack(rle_masks, axis=2), False)
        for k, i in enumerate(rle_idx):
            masks[i] = stack[:, :, k]
    arr = np.stack(masks) if masks else np.zeros((0,) + tuple(size), dtype=bool)
    return classes, arr


def semantic_masks(sem_seg: np.ndarray, ignore_label: int) -> Tuple[List[int], np.ndarray]:
    """One mask per label present in ``sem_seg`` (ascending), ``ignore_label`` excluded."""
    labels = np.unique(sem_seg)
    labels = labels[labels != ignore_label]
    masks = np.stack([sem_seg == c for c in labels]) if len(labels) else _no_masks(sem_seg)
    return [int(c) for c in labels], masks


def non_crowd(segments: List[dict]) -> List[dict]:
    """The segments that become targets: those not marked ``iscrowd``, in their order."""
    return [s for s in segments if not s.get("iscrowd", 0)]


def panoptic_masks(pan_seg: np.ndarray, segments: List[dict]) -> Tuple[List[int], np.ndarray]:
    """One mask per non-crowd segment of ``segments`` (in their order)."""
    keep = non_crowd(segments)
    masks = np.stack([pan_seg == s["id"] for s in keep]) if keep else _no_masks(pan_seg)
    return [int(s["category_id"]) for s in keep], masks


def _no_masks(like: np.ndarray) -> np.ndarray:
    return np.zeros((0,) + like.shape[:2], dtype=bool)


def category_map(pan_seg: np.ndarray, segments: List[dict], ignore_label: int) -> np.ndarray:
    """The category of each pixel of a panoptic id map (``ignore_label`` where no segment is)."""
    ids, inverse = np.unique(pan_seg, return_inverse=True)
    lut = np.full(len(ids), ignore_label, dtype=np.int64)
    pos = {int(v): i for i, v in enumerate(ids)}
    for s in segments:
        i = pos.get(int(s["id"]))
        if i is not None:
            lut[i] = int(s["category_id"])
    return lut[inverse.reshape(pan_seg.shape)]
