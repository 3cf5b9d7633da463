"""The annotation formats the families' files come in, and their loaders: COCO panoptic
(PNG + ``segments_info``), COCO instances (polygons / RLE), and the plain semantic-segmentation
layout (an image folder + a label-PNG folder). Every family and the YAML-described datasets load
through these; :mod:`.coco` re-exports them under their former path."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Dict, List, Optional

import pycocotools.mask as mask_util

from ..catalog import MetadataCatalog
from ..ids import category_table
from ._common import (
    COCO_LAYOUT,
    SEM_SEG_LAYOUT,
    DatasetFormatError,
    contiguous_segments,
    load_json,
    panoptic_entries,
    require_dir,
)

__all__ = ["load_coco_panoptic_json", "load_coco_instances_json", "load_sem_seg"]

logger = logging.getLogger(__name__)

XYWH_ABS = 1  # bbox_mode of COCO boxes


def load_coco_panoptic_json(
    json_file: str, image_dir: str, gt_dir: str, meta: Any, sem_seg_dir: Optional[str] = None
) -> List[dict]:
    """Read a COCO panoptic annotation file.

    Args:
        json_file: e.g. ``coco/annotations/panoptic_train2017.json``.
        image_dir: directory of the images, e.g. ``coco/train2017``.
        gt_dir: directory of the panoptic PNGs, e.g. ``coco/panoptic_train2017``.
        meta: dict or Metadata with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id`` (dataset category id -> contiguous id). A
            category in the thing table is a thing; otherwise it must be in the stuff table.
        sem_seg_dir: optional directory of semantic PNGs with the same names as the panoptic
            PNGs (adds ``sem_seg_file_name``).

    Returns:
        one dict per annotated image: ``file_name``, ``image_id``, ``pan_seg_file_name``,
        ``segments_info`` (``id``, contiguous ``category_id``, ``isthing``, ``iscrowd``,
        ``area``, ``bbox``), ``height``/``width`` when the JSON lists the image, and
        ``sem_seg_file_name`` if ``sem_seg_dir`` is given.
    """
    require_dir(image_dir, "image", COCO_LAYOUT)
    require_dir(gt_dir, "panoptic PNG", COCO_LAYOUT)
    if sem_seg_dir is not None:
        require_dir(sem_seg_dir, "semantic PNG", COCO_LAYOUT)
    data = load_json(json_file, "panoptic annotation file", COCO_LAYOUT)
    entries = panoptic_entries(data, json_file)
    things = category_table(meta, "thing")
    stuff = category_table(meta, "stuff")
    if not things and not stuff:
        raise ValueError(
            "load_coco_panoptic_json needs metadata with 'thing_dataset_id_to_contiguous_id' / "
            "'stuff_dataset_id_to_contiguous_id'"
        )
    images = {img["id"]: img for img in data.get("images", []) if isinstance(img, dict)}

    ret = []
    for k, raw_id, png, segs in entries:
        img = images.get(raw_id)
        if img is not None and "file_name" in img:
            image_file = os.path.join(image_dir, img["file_name"])
        else:  # COCO convention: same base name as the PNG, ".jpg"
            image_file = os.path.join(image_dir, os.path.splitext(png)[0] + ".jpg")
        segments = contiguous_segments(
            segs, things, stuff, f"{json_file}: annotation #{k} (image {raw_id!r})",
            "which is in neither the thing nor the stuff table of the metadata")
        record = {
            "file_name": image_file,
            # as in the json (COCO: ints; ADE20K, Cityscapes, Mapillary: strings, even of digits):
            # the evaluators look the id up in the same json
            "image_id": raw_id,
            "pan_seg_file_name": os.path.join(gt_dir, png),
            "segments_info": segments,
        }
        if img is not None and "height" in img and "width" in img:
            record["height"], record["width"] = int(img["height"]), int(img["width"])
        if sem_seg_dir is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_dir, png)
        ret.append(record)
    logger.info(f"Loaded {len(ret)} panoptic images from {json_file}")
    return ret


def load_coco_instances_json(
    json_file: str, image_root: str, meta: Any = None, dataset_name: Optional[str] = None
) -> List[dict]:
    """Read a COCO instances file (via pycocotools) into dataset dicts.

    Category ids become contiguous ids through ``meta['thing_dataset_id_to_contiguous_id']``;
    without that table the sorted category ids of the file are enumerated (and, when
    ``dataset_name`` is given, ``thing_classes`` and the table are stored in its metadata).
    Polygons with fewer than 3 points are dropped (an annotation left without any is skipped);
    uncompressed RLE is compressed. Boxes stay XYWH (``bbox_mode`` 1).
    """
    from pycocotools.coco import COCO

    require_dir(image_root, "image", COCO_LAYOUT)
    data = load_json(json_file, "instance annotation file", COCO_LAYOUT)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetFormatError(f"{json_file}: expected a top-level '{key}' list")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()

    id_map = category_table(meta, "thing")
    if not id_map:
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        id_map = {int(c["id"]): i for i, c in enumerate(cats)}
        if dataset_name is not None:
            m = MetadataCatalog.get(dataset_name)
            if m.get("thing_dataset_id_to_contiguous_id") is None:
                m.set(thing_classes=[c["name"] for c in cats],
                      thing_dataset_id_to_contiguous_id=dict(id_map))

    dropped = 0
    ret = []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": img_id,
        }
        objs = []
        for ann in coco.imgToAnns.get(img_id, []):
            cat = int(ann["category_id"])
            if cat not in id_map:
                raise DatasetFormatError(
                    f"{json_file}: annotation id {ann.get('id')} has category_id {cat}, which is "
                    "not in the metadata's thing_dataset_id_to_contiguous_id"
                )
            obj = {
                "iscrowd": int(ann.get("iscrowd", 0)),
                "category_id": id_map[cat],
                "bbox_mode": XYWH_ABS,
            }
            if "bbox" in ann:
                obj["bbox"] = [float(v) for v in ann["bbox"]]
            segm = ann.get("segmentation")
            if segm:
                if isinstance(segm, dict):
                    if isinstance(segm.get("counts"), list):
                        segm = mask_util.frPyObjects(segm, *segm["size"])
                else:
                    segm = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
                    if not segm:
                        dropped += 1
                        continue
                obj["segmentation"] = segm
            objs.append(obj)
        record["annotations"] = objs
        ret.append(record)
    if dropped:
        logger.warning(f"{json_file}: dropped {dropped} annotations without a valid polygon")
    logger.info(f"Loaded {len(ret)} images with instance annotations from {json_file}")
    return ret


def load_sem_seg(gt_root: str, image_root: str, gt_ext: str = "png",
                 image_ext: str = "jpg") -> List[dict]:
    """Pair images and label PNGs by their path relative to ``image_root`` / ``gt_root``
    without extension (searched recursively). Files without a partner are left out with a
    warning. Returns dicts with ``file_name`` and ``sem_seg_file_name``."""
    require_dir(image_root, "image", SEM_SEG_LAYOUT)
    require_dir(gt_root, "label PNG", SEM_SEG_LAYOUT)

    def index(root: str, ext: str) -> Dict[str, str]:
        out = {}
        for dirpath, _, files in os.walk(root, followlinks=True):
            for f in files:
                if f.endswith(ext):
                    path = os.path.join(dirpath, f)
                    key = os.path.normpath(os.path.relpath(path, root))[: -len(ext)].rstrip(".")
                    out[key] = path
        return out

    images = index(image_root, image_ext)
    labels = index(gt_root, gt_ext)
    if not labels:
        raise FileNotFoundError(f"no '*{gt_ext}' label files under {gt_root}\n{SEM_SEG_LAYOUT}")
    keys = sorted(set(images) & set(labels))
    if len(keys) != len(images) or len(keys) != len(labels):
        logger.warning(
            f"{image_root} has {len(images)} images and {gt_root} {len(labels)} label files; "
            f"using the {len(keys)} that pair up"
        )
    if not keys:
        raise FileNotFoundError(
            f"no image in {image_root} (*{image_ext}) matches a label file in {gt_root} "
            f"(*{gt_ext})\n{SEM_SEG_LAYOUT}"
        )
    return [{"file_name": images[k], "sem_seg_file_name": labels[k]} for k in keys]
