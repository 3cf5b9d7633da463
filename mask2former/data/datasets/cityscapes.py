"""The Cityscapes family (fine annotations): semantic, instance and panoptic segmentation.

* ``METADATA``: ``cityscapes_fine_{sem_seg,instance_seg}_{train,val,test}`` (19 classes in
  train-id order, 8 of them things) and ``cityscapes_fine_panoptic_{train,val}`` (contiguous ids
  are the train ids), from ``metadata/cityscapes.json``.
* ``SPECS``: those datasets under ``$DETECTRON2_DATASETS/cityscapes/`` (:data:`LAYOUT`), read
  by the loaders here: :func:`load_cityscapes_semantic`, :func:`load_cityscapes_instances`,
  :func:`load_cityscapes_panoptic`.
* ``PREPARE``: none; the train-id labels and panoptic annotations are made with the official
  cityscapesscripts (see ``datasets/README.md``).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..catalog import MetadataCatalog, builtin_categories
from ..ids import category_table
from ..image_io import read_image
from ._common import README, DatasetFormatError, contiguous_segments, load_json, panoptic_entries
from .register import DatasetSpec

__all__ = ["LAYOUT", "load_cityscapes_semantic", "load_cityscapes_instances",
           "load_cityscapes_panoptic", "METADATA", "SPECS", "PREPARE"]

logger = logging.getLogger(__name__)

# Shown (with the dataset's own paths) when a dataset is used but its files are missing.
LAYOUT = """\
cityscapes/
  leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds}.png
                                          (from gtFine_trainvaltest.zip)
  gtFine/.../*_gtFine_labelTrainIds.png   made by cityscapesscripts' createTrainIdLabelImgs.py
  gtFine/cityscapes_panoptic_{train,val}.json, gtFine/cityscapes_panoptic_{train,val}/
                                          made by cityscapesscripts' createPanopticImgs.py"""


# ----------------------------------------------------------------------------- metadata
def _classes() -> List[dict]:
    return sorted(builtin_categories("cityscapes"), key=lambda c: c["trainId"])


def _semantic_or_instance(task: str) -> dict:
    cats = _classes()
    things = [c for c in cats if c["isthing"]]
    meta = {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
    }
    if task == "sem_seg":
        meta.update(evaluator_type="cityscapes_sem_seg", ignore_label=255)
    else:
        meta.update(evaluator_type="cityscapes_instance")
    return meta


def _panoptic() -> dict:
    cats = _classes()
    return {
        # contiguous ids are the Cityscapes train ids (0..18)
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [c["color"] for c in cats],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in cats if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: c["trainId"] for c in cats if not c["isthing"]
        },
        "evaluator_type": "cityscapes_panoptic_seg",
        "ignore_label": 255,
        "label_divisor": 1000,
    }


METADATA = {f"cityscapes_fine_{task}_{split}": partial(_semantic_or_instance, task)
            for split in ("train", "val", "test") for task in ("sem_seg", "instance_seg")}
METADATA.update({f"cityscapes_fine_panoptic_{split}": _panoptic for split in ("train", "val")})


# ----------------------------------------------------------------------------- loaders
_CS_IMAGE_SUFFIX = "_leftImg8bit.png"
# Cityscapes label ids of the eight classes with instances (person ... bicycle), in train-id order
_CS_THING_IDS = (24, 25, 26, 27, 28, 31, 32, 33)
_CS_FIRST_INSTANCE_LABEL = 24  # instanceIds pixels below this are stuff label ids


def _cityscapes_images(image_dir: str) -> List[Tuple[str, str, str]]:
    """``(image_file, city, base)`` for ``image_dir/<city>/<base>_leftImg8bit.png``, sorted."""
    out = []
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if not os.path.isdir(city_dir):
            continue
        for f in sorted(os.listdir(city_dir)):
            if f.endswith(_CS_IMAGE_SUFFIX):
                out.append((os.path.join(city_dir, f), city, f[: -len(_CS_IMAGE_SUFFIX)]))
    if not out:
        raise FileNotFoundError(
            f"no '<city>/*{_CS_IMAGE_SUFFIX}' images under {image_dir}\n"
            + LAYOUT + f"\nSee {README}.")
    return out


def _require_files(paths: Sequence[str], what: str, hint: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} {what} are missing, e.g. {missing[0]}\n{hint}\n"
            f"See {README}.")


def load_cityscapes_semantic(image_dir: str, gt_dir: str) -> List[dict]:
    """Cityscapes fine semantic segmentation: images ``image_dir/<city>/*_leftImg8bit.png`` with
    labels ``gt_dir/<city>/*_gtFine_labelTrainIds.png`` (train ids 0..18, 255 = ignore).

    Returns dicts with ``file_name``, ``sem_seg_file_name`` and ``image_id`` (``<city>_<seq>_<frame>``).
    """
    ret = []
    for image_file, city, base in _cityscapes_images(image_dir):
        ret.append({
            "file_name": image_file,
            "sem_seg_file_name": os.path.join(gt_dir, city, base + "_gtFine_labelTrainIds.png"),
            "image_id": base,
        })
    _require_files([r["sem_seg_file_name"] for r in ret], "*_gtFine_labelTrainIds.png label files",
                   "Create them with cityscapesscripts: CITYSCAPES_DATASET=<root>/cityscapes "
                   "python -m cityscapesscripts.preparation.createTrainIdLabelImgs")
    logger.info("Loaded %d Cityscapes images from %s", len(ret), image_dir)
    return ret


def _cityscapes_instances_of(image_file: str, inst_file: str, base: str) -> dict:
    import pycocotools.mask as mask_util

    ids = read_image(inst_file).astype(np.int64)
    if ids.ndim != 2:
        raise DatasetFormatError(f"{inst_file}: expected a single-channel instance-id image, "
                                 f"got shape {ids.shape}")
    height, width = ids.shape
    contiguous = {label: i for i, label in enumerate(_CS_THING_IDS)}
    annos = []
    for value in np.unique(ids[ids >= _CS_FIRST_INSTANCE_LABEL]).tolist():
        # instances are label_id * 1000 + k; a thing region without instances (a "group") keeps
        # the bare label id and becomes a crowd annotation
        label = value // 1000 if value >= 1000 else value
        if label not in contiguous:
            continue
        mask = ids == value
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annos.append({
            "category_id": contiguous[label],
            "iscrowd": int(value < 1000),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
            "bbox_mode": 0,  # XYXY_ABS
            "segmentation": rle,
        })
    return {"file_name": image_file, "image_id": base, "height": height, "width": width,
            "annotations": annos}


def load_cityscapes_instances(image_dir: str, gt_dir: str) -> List[dict]:
    """Cityscapes fine instance segmentation from ``gt_dir/<city>/*_gtFine_instanceIds.png``.

    Every instance of the eight thing classes becomes an annotation with an RLE mask
    (``category_id`` 0..7 in train-id order: person, rider, car, truck, bus, train, motorcycle,
    bicycle) and its XYXY box; a region labelled with a bare class id (a "group") is a crowd
    annotation. The ``*_polygons.json`` files are not used (they need polygon clipping, as
    Detectron2 does with shapely); masks decoded from the instance-id PNGs are what the
    official evaluation compares against anyway.
    """
    files = _cityscapes_images(image_dir)
    inst_files = [os.path.join(gt_dir, city, base + "_gtFine_instanceIds.png")
                  for _, city, base in files]
    _require_files(inst_files, "*_gtFine_instanceIds.png files",
                   "They are part of gtFine_trainvaltest.zip.")
    # PNG decoding and the per-instance numpy work release the GIL: threads help
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        ret = list(pool.map(lambda job: _cityscapes_instances_of(*job),
                            [(f, inst, base) for (f, _, base), inst in zip(files, inst_files)]))
    logger.info("Loaded %d Cityscapes images with instances from %s", len(ret), image_dir)
    return ret


def load_cityscapes_panoptic(image_dir: str, gt_dir: str, gt_json: str, meta: Any) -> List[dict]:
    """Cityscapes panoptic segmentation in the COCO-panoptic format written by cityscapesscripts'
    ``createPanopticImgs.py``: ``gt_json`` (annotations with ``image_id`` =
    ``<city>_<seq>_<frame>`` and ``segments_info`` with Cityscapes label ids), PNGs in ``gt_dir``.

    Category ids become train ids through the metadata tables; ``sem_seg_file_name`` is the
    matching ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (not checked here: only the
    semantic evaluation reads it).
    """
    data = load_json(gt_json, "Cityscapes panoptic annotation file",
                     LAYOUT + f"\nSee {README}.")
    entries = panoptic_entries(data, gt_json)
    images = {base: (f, city) for f, city, base in _cityscapes_images(image_dir)}
    things = category_table(meta, "thing")
    stuff = category_table(meta, "stuff")
    sem_dir = os.path.join(os.path.dirname(os.path.normpath(gt_dir)),
                           os.path.basename(os.path.normpath(image_dir)))
    ret = []
    for k, image_id, png, segs in entries:
        if image_id not in images:
            raise DatasetFormatError(
                f"{gt_json}: annotation #{k} is for image {image_id!r}, which has no "
                f"{image_id}{_CS_IMAGE_SUFFIX} under {image_dir}")
        image_file, city = images[image_id]
        segments = contiguous_segments(
            segs, things, stuff, f"{gt_json}: annotation #{k} (image {image_id!r})",
            "which is not a Cityscapes class with a train id")
        ret.append({
            "file_name": image_file,
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(gt_dir, png),
            "sem_seg_file_name": os.path.join(sem_dir, city, image_id + "_gtFine_labelTrainIds.png"),
            "segments_info": segments,
        })
    logger.info("Loaded %d Cityscapes panoptic images from %s", len(ret), gt_json)
    return ret


# ----------------------------------------------------------------------------- datasets
def _load_semantic(p: Dict[str, str], name: str) -> List[dict]:
    return load_cityscapes_semantic(p["image_dir"], p["gt_dir"])


def _load_instances(p: Dict[str, str], name: str) -> List[dict]:
    return load_cityscapes_instances(p["image_dir"], p["gt_dir"])


def _load_panoptic(p: Dict[str, str], name: str) -> List[dict]:
    return load_cityscapes_panoptic(p["image_root"], p["panoptic_root"], p["panoptic_json"],
                                    MetadataCatalog.get(name))


def _specs() -> List[DatasetSpec]:
    s = []
    for split in ("train", "val", "test"):
        images, gt = f"cityscapes/leftImg8bit/{split}", f"cityscapes/gtFine/{split}"
        # Detectron2 names these image_dir / gt_dir; image_root / sem_seg_root are given too
        s.append(DatasetSpec(f"cityscapes_fine_sem_seg_{split}", LAYOUT,
                             dict(image_dir=images, gt_dir=gt, image_root=images, sem_seg_root=gt),
                             ("image_dir", "gt_dir"), _load_semantic))
        s.append(DatasetSpec(f"cityscapes_fine_instance_seg_{split}", LAYOUT,
                             dict(image_dir=images, gt_dir=gt, image_root=images),
                             ("image_dir", "gt_dir"), _load_instances))
    for split in ("train", "val"):
        paths = dict(image_root=f"cityscapes/leftImg8bit/{split}",
                     panoptic_root=f"cityscapes/gtFine/cityscapes_panoptic_{split}",
                     panoptic_json=f"cityscapes/gtFine/cityscapes_panoptic_{split}.json",
                     gt_dir=f"cityscapes/gtFine/{split}")
        s.append(DatasetSpec(f"cityscapes_fine_panoptic_{split}", LAYOUT, paths,
                             ("image_root", "panoptic_root", "panoptic_json"), _load_panoptic))
    return s


SPECS = _specs()

PREPARE: Dict[str, Any] = {}  # prepared with cityscapesscripts
