"""The ADE20K family: scene parsing with 150 classes (semantic, panoptic, instance) and
ADE20K-full with 847 classes (semantic).

* ``METADATA``: ``ade20k_sem_seg_{train,val}``, ``ade20k_panoptic_{train,val}`` and
  ``ade20k_instance_{train,val}`` (from ``metadata/ade20k_150.json`` and
  ``metadata/ade20k_instance_100.json``), ``ade20k_full_sem_seg_{train,val}``
  (``metadata/ade20k_847.json``; 16-bit labels, ignore 65535).
* ``SPECS``: those datasets under ``$DETECTRON2_DATASETS/ADEChallengeData2016/`` and
  ``ADE20K_2021_17_01/`` (layouts :data:`LAYOUT`, :data:`FULL_LAYOUT`), read by the loaders of
  :mod:`.formats`.
* ``PREPARE``: the conversions of the official downloads (``python -m mask2former.data.prepare``):

  - ``ade20k_sem_seg``: ``annotations/{training,validation}/*.png`` (0 = "other", 1..150 =
    classes) -> ``annotations_detectron2/...``: each label minus one, so that the classes are
    0..149 and "other" becomes the ignore label 255 (:func:`ade20k_label_to_detectron2`).
  - ``ade20k_full``: ``ADE20K_2021_17_01/images/**/<name>.jpg`` with ``<name>_seg.png`` ->
    ``images_detectron2/{training,validation}/<name>.jpg`` and 16-bit
    ``annotations_detectron2/{training,validation}/<name>.tif`` (:func:`ade20k_full_labels`), the
    shorter side brought down to 512 pixels when longer.
  - ``ade20k_panoptic``: ``annotations/`` with ``annotations_instance/`` (from
    ``annotations_instance.tar`` of the 2017 Places challenge) ->
    ``ade20k_panoptic_{train,val}/*.png`` and ``ade20k_panoptic_{train,val}.json``
    (:func:`ade20k_panoptic_of`).
  - ``ade20k_instance``: ``annotations_instance/`` -> ``ade20k_instance_{train,val}.json``, COCO
    instances with RLE masks and the ADE20K-150 ids of the 100 instance classes
    (:func:`ade20k_instance_annotations`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..catalog import builtin_categories
from ...utils.file_io import atomic_write
from ..ids import id2rgb
from ._common import (
    datasets_root,
    instances_metadata,
    panoptic_metadata,
    read_array,
    run_jobs,
)
from .register import DatasetSpec, coco_instances_spec, coco_panoptic_spec, sem_seg_spec

__all__ = ["LAYOUT", "FULL_LAYOUT", "METADATA", "SPECS", "PREPARE", "ade20k_label_to_detectron2",
           "convert_ade20k_sem_seg", "ade20k_full_labels", "convert_ade20k_full",
           "ade20k_instance_masks", "ade20k_panoptic_of", "convert_ade20k_panoptic",
           "ade20k_instance_annotations", "convert_ade20k_instance"]

ADE = "ADEChallengeData2016"  # ADE20K of the scene-parsing challenge (150 classes)
ADE_FULL = "ADE20K_2021_17_01"  # the full ADE20K release (847 evaluated classes)
ADE_SPLITS = (("train", "training"), ("val", "validation"))  # name suffix, folder
_ADE_FULL_IGNORE = 65535  # ADE20K-full labels are 16-bit images
_ADE_HINT = "unzip ADEChallengeData2016.zip (see datasets/README.md)"

# Shown (with the dataset's own paths) when a dataset is used but its files are missing.
LAYOUT = """\
ADEChallengeData2016/
  images/{training,validation}/           images (ADE_*.jpg)
  annotations/{training,validation}/      official label PNGs (0 = other, 1..150 = classes)
  annotations_detectron2/{training,validation}/
                                          labels - 1, 0 -> 255
                                          (python -m mask2former.data.prepare ade20k_sem_seg)
  ade20k_panoptic_{train,val}.json        panoptic annotations   (python -m mask2former.data.prepare
  ade20k_panoptic_{train,val}/            panoptic PNGs           ade20k_panoptic)
  ade20k_instance_{train,val}.json        COCO-format instances  (... prepare ade20k_instance)"""

FULL_LAYOUT = """\
ADE20K_2021_17_01/
  images_detectron2/{training,validation}/       images (*.jpg)
  annotations_detectron2/{training,validation}/  16-bit TIFF labels (847 classes, 65535 = ignore)
                                          (python -m mask2former.data.prepare ade20k_full)"""


# ----------------------------------------------------------------------------- metadata
def _sem_seg() -> dict:
    cats = builtin_categories("ade20k_150")
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "evaluator_type": "sem_seg",
        "ignore_label": 255,
    }


def _full() -> dict:
    cats = builtin_categories("ade20k_847")
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in cats},
        "evaluator_type": "sem_seg",
        "ignore_label": _ADE_FULL_IGNORE,
    }


def _panoptic() -> dict:
    meta = panoptic_metadata(builtin_categories("ade20k_150"))
    meta.update(evaluator_type="ade20k_panoptic_seg", ignore_label=255, label_divisor=1000)
    return meta


def _instance() -> dict:
    # the 100 instance classes keep their ADE20K-150 ids and colours
    color_of = {c["id"]: c["color"] for c in builtin_categories("ade20k_150")}
    cats = [dict(c, color=color_of[c["id"]]) for c in builtin_categories("ade20k_instance_100")]
    meta = instances_metadata(cats)
    meta.update(evaluator_type="coco")
    return meta


METADATA = {f"{kind}_{split}": builder for split, _ in ADE_SPLITS
            for kind, builder in (("ade20k_sem_seg", _sem_seg), ("ade20k_full_sem_seg", _full),
                                  ("ade20k_panoptic", _panoptic), ("ade20k_instance", _instance))}


# ----------------------------------------------------------------------------- datasets
def _specs() -> List[DatasetSpec]:
    s = []
    for split, d in ADE_SPLITS:
        images, labels = f"{ADE}/images/{d}", f"{ADE}/annotations_detectron2/{d}"
        instances = f"{ADE}/ade20k_instance_{split}.json"
        s.append(sem_seg_spec(f"ade20k_sem_seg_{split}", LAYOUT, images, labels))
        s.append(coco_panoptic_spec(f"ade20k_panoptic_{split}", LAYOUT, image_root=images,
                                    panoptic_root=f"{ADE}/ade20k_panoptic_{split}",
                                    panoptic_json=f"{ADE}/ade20k_panoptic_{split}.json",
                                    sem_seg_root=labels, json_file=instances))
        s.append(coco_instances_spec(f"ade20k_instance_{split}", LAYOUT, images, instances))
        s.append(sem_seg_spec(f"ade20k_full_sem_seg_{split}", FULL_LAYOUT,
                              f"{ADE_FULL}/images_detectron2/{d}",
                              f"{ADE_FULL}/annotations_detectron2/{d}", gt_ext="tif"))
    return s


SPECS = _specs()


# ----------------------------------------------------------------------------- preparation
def ade20k_label_to_detectron2(label: np.ndarray) -> np.ndarray:
    """ADE20K label map (uint8, 0 = other) -> classes 0..149 with 255 for "other"."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f"ADE20K labels must be 8-bit; got {label.dtype}")
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255


def convert_ade20k_sem_seg(root: Optional[str] = None, workers: int = 4) -> List[str]:
    """``annotations/{training,validation}/*.png`` -> ``annotations_detectron2/...`` (see
    :func:`ade20k_label_to_detectron2`)."""
    base = os.path.join(datasets_root(root), ADE)
    outputs = []
    for split in ("training", "validation"):
        src = os.path.join(base, "annotations", split)
        dst = os.path.join(base, "annotations_detectron2", split)
        if not os.path.isdir(src):
            raise FileNotFoundError(
                f"{src} not found: unpack ADEChallengeData2016.zip under {datasets_root(root)} "
                "(see datasets/README.md)")
        os.makedirs(dst, exist_ok=True)
        jobs = [(os.path.join(src, f), os.path.join(dst, f)) for f in sorted(os.listdir(src))
                if f.endswith(".png")]

        def convert(a: str, b: str) -> None:
            Image.fromarray(ade20k_label_to_detectron2(read_array(a, _ADE_HINT))).save(b)

        run_jobs(jobs, convert, workers, f"ADE20K {split}")
        outputs.append(dst)
    return outputs


# ----------------------------------------------------------------------------- ADE20K-full
_ADE_FULL_MAX_SHORT_SIDE = 512


def ade20k_full_labels(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K-full ``*_seg.png`` (H, W, 3) -> uint16 train ids 0..846, 65535 elsewhere.

    The object class of a pixel is ``(R // 10) * 256 + G`` (the ADE20K index of ``objects.txt``);
    the 847 evaluated classes map to their train ids by the package's ``ade20k_847`` table.
    """
    rgb = np.asarray(seg_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 2:
        raise ValueError(f"an ADE20K *_seg.png must be a colour image; got shape {rgb.shape}")
    cls = (rgb[..., 0].astype(np.int64) // 10) * 256 + rgb[..., 1].astype(np.int64)
    lut = np.full((255 // 10) * 256 + 256, _ADE_FULL_IGNORE, dtype=np.uint16)
    for c in builtin_categories("ade20k_847"):
        lut[int(c["id"])] = int(c["trainId"])
    return lut[cls]


def _ade_full_size(h: int, w: int) -> Optional[Tuple[int, int]]:
    """(h, w) after bringing the shorter side down to 512 (None: unchanged), as the official
    MaskFormer preparation does."""
    m = _ADE_FULL_MAX_SHORT_SIDE
    if w >= h > m:
        return m, round(w / float(h) * m)
    if h >= w > m:
        return round(h / float(w) * m), m
    return None


def convert_ade20k_full(root: Optional[str] = None, workers: int = 4) -> List[str]:
    """``ADE20K_2021_17_01/images/**`` -> ``images_detectron2/`` and ``annotations_detectron2/``
    (see :func:`ade20k_full_labels`)."""
    import cv2

    base = os.path.join(datasets_root(root), ADE_FULL)
    src = os.path.join(base, "images")
    if not os.path.isdir(src):
        raise FileNotFoundError(
            f"{src} not found: unpack the ADE20K_2021_17_01 release (from the ADE20K website) "
            f"under {datasets_root(root)} (see datasets/README.md)")
    jobs = []
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".jpg"):
                # ADE_val_* are the validation images, all others (ADE_train_*, ADE_frame_*) training
                split = "validation" if f.split("_")[1:2] == ["val"] else "training"
                jobs.append((os.path.join(dirpath, f), split))
    if not jobs:
        raise FileNotFoundError(f"no *.jpg images under {src} (see datasets/README.md)")
    jobs.sort(key=lambda j: os.path.basename(j[0]))
    for split in ("training", "validation"):
        os.makedirs(os.path.join(base, "images_detectron2", split), exist_ok=True)
        os.makedirs(os.path.join(base, "annotations_detectron2", split), exist_ok=True)

    def convert(image_file: str, split: str) -> None:
        seg_file = image_file[: -len(".jpg")] + "_seg.png"
        img = read_array(image_file, "it was listed a moment ago")
        labels = ade20k_full_labels(read_array(seg_file, f"the labels of {image_file}", "RGB"))
        if labels.shape != img.shape[:2]:
            raise ValueError(f"{seg_file} is {labels.shape[0]}x{labels.shape[1]} but {image_file} "
                             f"is {img.shape[0]}x{img.shape[1]}")
        size = _ade_full_size(*labels.shape)
        if size is not None:
            img = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)
            labels = cv2.resize(labels, size[::-1], interpolation=cv2.INTER_NEAREST)
        name = os.path.basename(image_file)
        # re-encoded with PIL's default JPEG settings, like the official output the published
        # ADE20K-full results were obtained on
        Image.fromarray(img).save(os.path.join(base, "images_detectron2", split, name))
        Image.fromarray(labels).save(
            os.path.join(base, "annotations_detectron2", split, name[: -len(".jpg")] + ".tif"))

    run_jobs(jobs, convert, workers, "ADE20K-full")
    return [os.path.join(base, d, s) for d in ("images_detectron2", "annotations_detectron2")
            for s in ("training", "validation")]


# ----------------------------------------------------------------------------- ADE20K panoptic / instances
_ADE_INSTANCE_HINT = ("download annotations_instance.tar (sceneparsing.csail.mit.edu, ChallengeData2017) "
                      "and unpack it into ADEChallengeData2016/ (see datasets/README.md)")


def _bbox_area(mask: np.ndarray) -> Tuple[List[int], int]:
    ys = np.nonzero(mask.any(axis=1))[0]
    xs = np.nonzero(mask.any(axis=0))[0]
    box = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
    return box, int(mask.sum())


def ade20k_instance_masks(ins: np.ndarray, where: str = "instance map") -> List[Tuple[np.ndarray, int]]:
    """The instances of an ADE20K ``annotations_instance`` PNG, as ``(mask (H, W) bool,
    ADE20K-150 class id 0..149)`` in increasing instance id.

    The PNG's R channel is the instance class (1..100, the order of the package's
    ``ade20k_instance_100`` table, whose ids are the ADE20K-150 ids), G the instance id (0 = none).
    """
    ins = np.asarray(ins)
    if ins.ndim != 3 or ins.shape[2] < 2 or ins.dtype != np.uint8:
        raise ValueError(f"{where}: expected an 8-bit colour image (R = class, G = instance id); "
                         f"got {ins.dtype} of shape {ins.shape}")
    classes = [int(c["id"]) for c in builtin_categories("ade20k_instance_100")]
    out = []
    for k in np.unique(ins[..., 1]).tolist():
        if k == 0:
            continue
        mask = ins[..., 1] == k
        cats = np.unique(ins[..., 0][mask]).tolist()
        if len(cats) != 1 or not 1 <= cats[0] <= len(classes):
            raise ValueError(f"{where}: instance {k} has class values {cats[:10]}; expected one "
                             f"value in 1..{len(classes)}")
        out.append((mask, classes[cats[0] - 1]))
    return out


def ade20k_panoptic_of(sem: np.ndarray, ins: np.ndarray, where: str = "image") -> Tuple[np.ndarray, List[dict]]:
    """Panoptic segmentation of one ADE20K image.

    Args:
        sem: (H, W) uint8 scene-parsing labels (0 = other, 1..150).
        ins: (H, W, 3) uint8 instance PNG (see :func:`ade20k_instance_masks`).
        where: names the image in errors.

    Returns:
        ``(ids, segments_info)``: (H, W) int32 segment ids (0 = void) and, per segment, ``id``,
        ``category_id`` (ADE20K-150 id 0..149), ``area``, ``bbox`` (XYWH) and ``iscrowd`` 0.
        Each stuff class of ``sem`` is one segment; pixels of thing classes in ``sem`` are left
        void; then every instance is pasted on top (the two annotations overlap a little).
        Areas and boxes are measured on the result, and a segment covered entirely by
        instances is dropped (the official script keeps it, with its area before pasting).
    """
    sem = np.asarray(sem)
    if sem.ndim != 2 or sem.dtype != np.uint8:
        raise ValueError(f"{where}: the semantic labels must be an 8-bit single-channel image; "
                         f"got {sem.dtype} of shape {sem.shape}")
    if np.asarray(ins).shape[:2] != sem.shape:
        raise ValueError(f"{where}: the instance map is {ins.shape[0]}x{ins.shape[1]} but the "
                         f"semantic labels are {sem.shape[0]}x{sem.shape[1]}")
    cats = builtin_categories("ade20k_150")
    if int(sem.max(initial=0)) > len(cats):
        raise ValueError(f"{where}: semantic label {int(sem.max())} is not in 0..{len(cats)}")
    ids = np.zeros(sem.shape, np.int32)
    category: Dict[int, int] = {}
    for label in np.unique(sem).tolist():
        if label == 0 or cats[label - 1]["isthing"]:
            continue
        category[len(category) + 1] = label - 1
        ids[sem == label] = len(category)
    for mask, cat in ade20k_instance_masks(ins, where):
        category[len(category) + 1] = cat
        ids[mask] = len(category)
    segments = []
    for sid, cat in category.items():
        mask = ids == sid
        if not mask.any():
            continue
        box, area = _bbox_area(mask)
        segments.append({"id": sid, "category_id": cat, "area": area, "bbox": box, "iscrowd": 0})
    return ids, segments


def _ade_images(image_dir: str) -> List[str]:
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir} not found: {_ADE_HINT}")
    names = sorted(f[: -len(".jpg")] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not names:
        raise FileNotFoundError(f"no *.jpg images in {image_dir}")
    return names


def _image_info(path: str, image_id: str) -> dict:
    with Image.open(path) as im:  # the header only: the size
        w, h = im.size
    return {"id": image_id, "file_name": os.path.basename(path), "width": w, "height": h}


def convert_ade20k_panoptic(root: Optional[str] = None, workers: int = 4) -> List[str]:
    """``annotations/`` + ``annotations_instance/`` -> ``ade20k_panoptic_{train,val}/`` and
    ``ade20k_panoptic_{train,val}.json`` (see :func:`ade20k_panoptic_of`)."""
    base = os.path.join(datasets_root(root), ADE)
    categories = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": c["color"]}
                  for c in builtin_categories("ade20k_150")]
    outputs = []
    for name, dirname in ADE_SPLITS:
        image_dir = os.path.join(base, "images", dirname)
        names = _ade_images(image_dir)
        out_dir = os.path.join(base, f"ade20k_panoptic_{name}")
        os.makedirs(out_dir, exist_ok=True)

        def convert(stem: str) -> Tuple[dict, dict]:
            sem_file = os.path.join(base, "annotations", dirname, stem + ".png")
            ins_file = os.path.join(base, "annotations_instance", dirname, stem + ".png")
            sem = read_array(sem_file, _ADE_HINT)
            ins = read_array(ins_file, _ADE_INSTANCE_HINT)
            image = _image_info(os.path.join(image_dir, stem + ".jpg"), stem)
            if sem.shape[:2] != (image["height"], image["width"]):
                raise ValueError(f"{sem_file} is {sem.shape[0]}x{sem.shape[1]} but the image is "
                                 f"{image['height']}x{image['width']}")
            ids, segments = ade20k_panoptic_of(sem, ins, f"{sem_file} + {ins_file}")
            Image.fromarray(id2rgb(ids)).save(os.path.join(out_dir, stem + ".png"))
            return image, {"image_id": stem, "file_name": stem + ".png", "segments_info": segments}

        results = run_jobs([(n,) for n in names], convert, workers, f"ADE20K panoptic {name}")
        out_json = os.path.join(base, f"ade20k_panoptic_{name}.json")
        atomic_write(out_json, json.dumps({"images": [r[0] for r in results],
                                           "annotations": [r[1] for r in results], "categories": categories}))
        outputs += [out_dir, out_json]
    return outputs


def ade20k_instance_annotations(ins: np.ndarray, image_id: Any, where: str = "instance map") -> List[dict]:
    """COCO annotations (no ``id`` yet) of the instances of an ADE20K instance PNG: ``image_id``,
    ``category_id`` (ADE20K-150 id), ``iscrowd`` 0, ``bbox`` (XYWH), ``segmentation`` (RLE with
    ``counts`` as str) and ``area``."""
    import pycocotools.mask as mask_util

    annos = []
    for mask, cat in ade20k_instance_masks(ins, where):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        box, area = _bbox_area(mask)
        annos.append({"image_id": image_id, "category_id": cat, "iscrowd": 0, "bbox": box,
                      "segmentation": rle, "area": area})
    return annos


def convert_ade20k_instance(root: Optional[str] = None, workers: int = 4) -> List[str]:
    """``annotations_instance/`` -> ``ade20k_instance_{train,val}.json`` (see
    :func:`ade20k_instance_annotations`)."""
    base = os.path.join(datasets_root(root), ADE)
    categories = [{"id": c["id"], "name": c["name"]} for c in builtin_categories("ade20k_instance_100")]
    outputs = []
    for name, dirname in ADE_SPLITS:
        image_dir = os.path.join(base, "images", dirname)
        names = _ade_images(image_dir)

        def convert(stem: str) -> Tuple[dict, List[dict]]:
            ins_file = os.path.join(base, "annotations_instance", dirname, stem + ".png")
            ins = read_array(ins_file, _ADE_INSTANCE_HINT)
            image = _image_info(os.path.join(image_dir, stem + ".jpg"), stem)
            if ins.shape[:2] != (image["height"], image["width"]):
                raise ValueError(f"{ins_file} is {ins.shape[0]}x{ins.shape[1]} but the image is "
                                 f"{image['height']}x{image['width']}")
            return image, ade20k_instance_annotations(ins, stem, ins_file)

        results = run_jobs([(n,) for n in names], convert, workers, f"ADE20K instances {name}")
        annotations = [a for _, annos in results for a in annos]
        for i, a in enumerate(annotations):
            a["id"] = i + 1
        out_json = os.path.join(base, f"ade20k_instance_{name}.json")
        atomic_write(out_json, json.dumps({"images": [r[0] for r in results], "annotations": annotations,
                                           "categories": categories}))
        outputs.append(out_json)
    return outputs


PREPARE = {"ade20k_sem_seg": convert_ade20k_sem_seg, "ade20k_full": convert_ade20k_full,
           "ade20k_panoptic": convert_ade20k_panoptic, "ade20k_instance": convert_ade20k_instance}
