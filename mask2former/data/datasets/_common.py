"""Shared helpers of the dataset loaders: JSON reading with precise errors, layout checks."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

__all__ = ["DatasetFormatError", "load_json", "require_dir", "meta_get", "int_key_table"]


class DatasetFormatError(ValueError):
    """A dataset file exists but does not have the expected content."""


def load_json(path: str, what: str = "annotation file", layout: str = "") -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} not found: {path}" + (f"\n{layout}" if layout else "")
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (character {e.pos}): "
            f"{e.msg}"
        ) from None


def require_dir(path: Optional[str], role: str, layout: str) -> None:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{role} directory not found: {path!r}\n{layout}")


def meta_get(meta: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a dict or a :class:`~mask2former.data.catalog.Metadata`."""
    return default if meta is None else meta.get(key, default)


def int_key_table(table: Optional[Dict[Any, Any]]) -> Dict[int, int]:
    """An id table with int keys and values (JSON round trips turn keys into strings)."""
    return {int(k): int(v) for k, v in (table or {}).items()}


COCO_LAYOUT = """Expected layout (COCO; any directory names can be passed explicitly):
  coco/
    train2017/                            images                (image_root)
    panoptic_train2017/                   panoptic PNGs         (panoptic_root / gt_dir)
    panoptic_semseg_train2017/            semantic PNGs         (sem_seg_root, optional)
    annotations/panoptic_train2017.json   panoptic annotations  (panoptic_json)
    annotations/instances_train2017.json  instance annotations  (json_file)"""

SEM_SEG_LAYOUT = """Expected layout (e.g. ADE20K):
  ADEChallengeData2016/
    images/training/                  images (image_root), e.g. ADE_train_00000001.jpg
    annotations_detectron2/training/  label PNGs (gt_root) with the same relative paths
                                      and base names, e.g. ADE_train_00000001.png"""


def contiguous_segments(segs, things: Dict[int, int], stuff: Dict[int, int], where: str,
                        unknown_hint: str) -> list:
    """COCO-panoptic ``segments_info`` with dataset category ids -> contiguous ids plus "isthing";
    an id in neither table is a DatasetFormatError naming ``where`` (file and annotation)."""
    out = []
    for seg in segs:
        cat = int(seg["category_id"])
        if cat in things:
            cid, isthing = things[cat], True
        elif cat in stuff:
            cid, isthing = stuff[cat], False
        else:
            raise DatasetFormatError(f"{where} has category_id {cat}, {unknown_hint}")
        out.append(dict(seg, id=int(seg["id"]), category_id=cid, isthing=isthing,
                        iscrowd=int(seg.get("iscrowd", 0))))
    return out
