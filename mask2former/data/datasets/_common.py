"""What every dataset family shares.

* errors: :class:`DatasetFormatError` (a file with the wrong content), :class:`DatasetNotFoundError`
  and :func:`missing_files_error` (a registered dataset whose files are not there: the missing
  paths, the family's layout and :data:`README`);
* reading: :func:`load_json` (errors name file, line and column), :func:`require_dir`,
  :func:`panoptic_entries` (the annotations of a COCO-panoptic json, checked) and
  :func:`contiguous_segments` (their ``segments_info`` -> contiguous ids);
* where the data lives: :func:`datasets_root` (``$DETECTRON2_DATASETS``, default ``./datasets``);
* metadata in Mask2Former's convention: :func:`panoptic_metadata`, :func:`instances_metadata`;
* for the preparation tools: :func:`run_jobs` (a thread pool with progress lines) and
  :func:`read_array` (an image or label file as an array, with errors the command line prints).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..image_io import MISSING_FILE, BadSampleError, read_image

__all__ = ["DatasetFormatError", "DatasetNotFoundError", "README", "datasets_root",
           "missing_files_error", "load_json", "require_dir", "panoptic_entries",
           "contiguous_segments", "panoptic_metadata", "instances_metadata", "run_jobs",
           "read_array"]

README = "datasets/README.md"


class DatasetFormatError(ValueError):
    """A dataset file exists but does not have the expected content."""


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset's files are not where its layout says they should be."""


def datasets_root(root: Optional[str] = None) -> str:
    """``root``, else ``$DETECTRON2_DATASETS``, else ``datasets`` (relative to the working
    directory, as in Detectron2), with ``~`` expanded."""
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(str(root))


def missing_files_error(name: str, root: str, layout: str,
                        missing: Sequence[Tuple[str, str]]) -> DatasetNotFoundError:
    """The error for dataset ``name`` whose ``(role, path)`` in ``missing`` do not exist under
    the datasets root ``root``; ``layout`` is the family's expected layout."""
    lines = [f"Dataset {name!r} is registered, but its files are not there:"]
    lines += [f"  {role}: {os.path.abspath(path)}" for role, path in missing]
    lines.append(f"Expected layout under the datasets root {os.path.abspath(root)!r} "
                 "($DETECTRON2_DATASETS, default ./datasets):")
    lines += ["  " + line for line in layout.splitlines()]
    lines.append(f"See {README} for where to download the dataset and how to prepare it, and set "
                 "DETECTRON2_DATASETS to the folder that holds it.")
    return DatasetNotFoundError("\n".join(lines))


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


def panoptic_entries(data: Any, json_file: str) -> List[Tuple[int, Any, str, list]]:
    """``(index, image_id, file_name, segments_info)`` of each annotation of a parsed
    COCO-panoptic json; a malformed or empty one is a DatasetFormatError naming ``json_file``."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DatasetFormatError(f"{json_file}: expected an object with an 'annotations' list")
    entries = []
    for k, ann in enumerate(data["annotations"]):
        try:
            entries.append((k, ann["image_id"], ann["file_name"], ann["segments_info"]))
        except (KeyError, TypeError) as e:
            raise DatasetFormatError(
                f"{json_file}: annotation #{k} lacks {e} (needs image_id, file_name, segments_info)"
            ) from None
    if not entries:
        raise DatasetFormatError(f"{json_file}: no annotations")
    return entries


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


def panoptic_metadata(cats: List[dict], *, all_thing_classes: bool = False,
                      stuff_table_all: bool = True) -> dict:
    """Class tables of a panoptic dataset whose contiguous ids enumerate ``cats`` (dicts with
    ``id``, ``name``, ``isthing``, ``color``; things and stuff together).

    ``stuff_classes`` / ``stuff_colors`` list every class and the thing table maps the things.
    ``thing_classes`` / ``thing_colors`` list the things, or every class with
    ``all_thing_classes`` (Mapillary Vistas in Mask2Former). The stuff table maps every class
    (so that the semantic evaluator can map predictions back), or only the stuff classes when
    ``stuff_table_all`` is False.
    """
    thing_src = cats if all_thing_classes else [c for c in cats if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in thing_src],
        "thing_colors": [c["color"] for c in thing_src],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(cats) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(cats) if stuff_table_all or not c["isthing"]
        },
    }


def instances_metadata(cats: List[dict]) -> dict:
    """Class tables of an instance dataset whose contiguous ids enumerate ``cats`` (dicts with
    ``id``, ``name``, ``color``)."""
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def run_jobs(jobs: Sequence[Tuple[Any, ...]], fn: Callable[..., Any], workers: int,
             what: str) -> List[Any]:
    """``fn(*job)`` for every job on ``workers`` threads, with progress lines; the results in
    job order."""
    done = 0
    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for r in pool.map(lambda job: fn(*job), jobs):
            results.append(r)
            done += 1
            if done % 1000 == 0 or done == len(jobs):
                print(f"{what}: {done}/{len(jobs)}", flush=True)
    return results


def read_array(path: str, hint: str, format: Optional[str] = None) -> np.ndarray:
    """:func:`~mask2former.data.image_io.read_image` for the preparation tools, whose command
    line reports FileNotFoundError / ValueError: a missing file says ``hint`` (what to download
    or unpack), an unreadable one why."""
    try:
        return read_image(path, format)
    except BadSampleError as e:
        if e.reason == MISSING_FILE:
            raise FileNotFoundError(f"{path} not found: {hint}") from None
        raise ValueError(f"{path}: cannot be read as an image ({e.detail})") from None
