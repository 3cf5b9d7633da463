"""Tiny datasets (two 64x96 images) in the official layouts of the built-in dataset families,
with ground truth made from a model's predictions (tests/test_eval_only_families.py).

:data:`LAYOUTS` gives, per family, the image ids and the paths (relative to the datasets root,
``{}`` = the image's file stem) where ``mask2former/data/datasets/<family>.py`` and
``datasets/README.md`` expect each file. :func:`write_images` writes the images there;
:func:`write_annotations` writes the ground truth of each image, given as a dict with any of

* ``"sem"``: (H, W) integer label map, in the family's label convention;
* ``"pan"``: ``(ids, segments)``: (H, W) segment ids (0 = VOID) and ``[(segment id, dataset
  category id)]``;
* ``"inst"``: ``[(mask (H, W) bool, dataset category id)]``.

:func:`write_cityscapes_ids` writes the ``*_gtFine_labelIds.png`` / ``*_gtFine_instanceIds.png``
that the Cityscapes scripts compare with (cityscapesscripts' preparation makes the train-id
labels and panoptic files from them; here all are written directly).

:class:`Prediction` holds a model's outputs on one image with contiguous class ids;
:func:`semantic_gt`, :func:`panoptic_gt` and :func:`instance_gt` turn them into GT (dataset
category ids through ``c2d``, the dataset ids in contiguous order) altered in known ways.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from mask2former.data.ids import id2rgb

H, W = 64, 96

_CS = "cityscapes/gtFine/val/frankfurt/{}_gtFine_"
_MV = "mapillary_vistas/validation/"
_ADE = "ADEChallengeData2016/"
_FULL = "ADE20K_2021_17_01/"

#: family -> image ids (the file stem is the id, or ``stem`` formatted with it) and paths
LAYOUTS: Dict[str, Dict[str, Any]] = {
    "coco": dict(ids=[139, 632], stem="{:012d}", image="coco/val2017/{}.jpg",
                 sem="coco/panoptic_semseg_val2017/{}.png", pan_png="coco/panoptic_val2017/{}.png",
                 pan_json="coco/annotations/panoptic_val2017.json",
                 inst_json="coco/annotations/instances_val2017.json"),
    "coco_stuff_10k": dict(ids=["COCO_train2014_000000000077", "COCO_train2014_000000000113"],
                           image="coco/coco_stuff_10k/images_detectron2/test/{}.jpg",
                           sem="coco/coco_stuff_10k/annotations_detectron2/test/{}.png"),
    "ade20k": dict(ids=["ADE_val_00000001", "ADE_val_00000002"], image=_ADE + "images/validation/{}.jpg",
                   sem=_ADE + "annotations_detectron2/validation/{}.png",
                   pan_png=_ADE + "ade20k_panoptic_val/{}.png", pan_json=_ADE + "ade20k_panoptic_val.json",
                   inst_json=_ADE + "ade20k_instance_val.json"),
    "ade20k_full": dict(ids=["ADE_val_00000001", "ADE_val_00000002"],
                        image=_FULL + "images_detectron2/validation/{}.jpg",
                        sem=_FULL + "annotations_detectron2/validation/{}.tif"),
    "mapillary_vistas": dict(ids=["0Mm4_SkqHYuw5pYSP7vd4A", "zx-Yc3fWGbLqYQ8f0jVd1g"],
                             image=_MV + "images/{}.jpg", sem=_MV + "labels/{}.png",
                             pan_png=_MV + "panoptic/{}.png", pan_json=_MV + "panoptic/panoptic_2018.json"),
    "cityscapes": dict(ids=["frankfurt_000000_000019", "frankfurt_000000_000294"],
                       image="cityscapes/leftImg8bit/val/frankfurt/{}_leftImg8bit.png",
                       sem=_CS + "labelTrainIds.png", label_ids=_CS + "labelIds.png",
                       instance_ids=_CS + "instanceIds.png",
                       pan_png="cityscapes/gtFine/cityscapes_panoptic_val/{}_gtFine_panoptic.png",
                       pan_json="cityscapes/gtFine/cityscapes_panoptic_val.json"),
}


def _path(root: Path, family: str, key: str, image_id: Any) -> Path:
    layout = LAYOUTS[family]
    stem = "" if image_id is None else layout.get("stem", "{}").format(image_id)
    path = Path(root) / layout[key].format(stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_images(root: Path, family: str) -> List[Tuple[Path, Any]]:
    """Smooth random colour images (a 4x6 random grid, bilinearly enlarged, plus noise): one per
    image id of ``family``. Returns ``[(path, image id)]``."""
    out = []
    for k, image_id in enumerate(LAYOUTS[family]["ids"]):
        rng = np.random.default_rng(k)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((W, H), Image.BILINEAR), np.float64) + rng.normal(0, 8, (H, W, 3))
        path = _path(root, family, "image", image_id)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        out.append((path, image_id))
    return out


def _box_area(mask: np.ndarray) -> Tuple[List[int], int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)], int(mask.sum())


def _image_entry(root: Path, family: str, image_id: Any) -> dict:
    return {"id": image_id, "file_name": _path(root, family, "image", image_id).name, "height": H, "width": W}


def write_annotations(root: Path, family: str, gts: Sequence[dict], pan_categories: Optional[list] = None,
                      inst_categories: Optional[list] = None) -> None:
    """The GT of each image of ``family`` (``gts`` in the order of its ids, see the module
    docstring) in the family's files; the json files get the categories given."""
    root = Path(root)
    ids = LAYOUTS[family]["ids"]
    images = [_image_entry(root, family, i) for i in ids]
    pan_anns, inst_anns = [], []
    for image_id, gt in zip(ids, gts):
        if gt.get("sem") is not None:
            path = _path(root, family, "sem", image_id)
            dtype = np.uint16 if path.suffix == ".tif" else np.uint8
            Image.fromarray(np.asarray(gt["sem"]).astype(dtype)).save(path)
        if gt.get("pan") is not None:
            seg, segments = gt["pan"]
            png = _path(root, family, "pan_png", image_id)
            Image.fromarray(id2rgb(seg)).save(png)
            infos = []
            for sid, cat in segments:
                box, area = _box_area(seg == sid)
                infos.append({"id": int(sid), "category_id": int(cat), "iscrowd": 0, "area": area, "bbox": box})
            pan_anns.append({"image_id": image_id, "file_name": png.name, "segments_info": infos})
        for mask, cat in gt.get("inst", ()):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            box, area = _box_area(mask)
            inst_anns.append({"id": len(inst_anns) + 1, "image_id": image_id, "category_id": int(cat),
                              "iscrowd": 0, "area": area, "bbox": box, "segmentation": rle})
    if pan_anns:
        _path(root, family, "pan_json", None).write_text(
            json.dumps({"images": images, "annotations": pan_anns, "categories": pan_categories}))
    if inst_categories is not None:
        _path(root, family, "inst_json", None).write_text(
            json.dumps({"images": images, "annotations": inst_anns, "categories": inst_categories}))


def write_cityscapes_ids(root: Path, image_id: str, label_ids: np.ndarray, instance_ids: np.ndarray) -> None:
    """``<core>_gtFine_labelIds.png`` (8-bit label ids) and ``<core>_gtFine_instanceIds.png``
    (16-bit: label id, or label id * 1000 + k for instance k of a thing class)."""
    Image.fromarray(np.asarray(label_ids).astype(np.uint8)).save(_path(root, "cityscapes", "label_ids", image_id))
    Image.fromarray(np.asarray(instance_ids).astype(np.uint16)).save(
        _path(root, "cityscapes", "instance_ids", image_id))


# ----------------------------------------------------------------------------- GT from predictions
@dataclass
class Prediction:
    sem: Optional[np.ndarray] = None                   # (H, W) argmax of sem_seg
    pan: Optional[Tuple[np.ndarray, list]] = None      # ids (0 = VOID), [(id, contiguous class, isthing)]
    inst: List[tuple] = field(default_factory=list)  # [(mask, contiguous class, score)]


def semantic_gt(pred: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """``pred`` with the top-left 16x24 block set to ``ignore`` and the bottom-right one to the
    next class."""
    gt = pred.copy()
    gt[:16, :24] = ignore
    gt[-16:, -24:] = (pred[-16:, -24:] + 1) % num_classes
    return gt


def panoptic_gt(preds: Sequence[Prediction], c2d: Sequence[int], isthing: Sequence[bool]):
    """The predicted segments in dataset ids; the first segment of the last image with segments
    gets the first category of its kind that nothing predicts. Returns the GT per image and the
    (GT category, predicted category) of every segment."""
    used = {c2d[c] for p in preds for _, c, _ in p.pan[1]}
    last = max(k for k, p in enumerate(preds) if p.pan[1])
    gts, pairs = [], []
    for k, p in enumerate(preds):
        segments = []
        for j, (sid, c, thing) in enumerate(p.pan[1]):
            assert isthing[c] == thing, "the model's thing/stuff split differs from the category table"
            gt_cat = c2d[c]
            if (k, j) == (last, 0):
                gt_cat = next(d for d, t in zip(c2d, isthing) if t == thing and d not in used)
            segments.append((sid, gt_cat))
            pairs.append((gt_cat, c2d[c]))
        gts.append((p.pan[0], segments))
    return gts, pairs


def instance_gt(preds: Sequence[Prediction], c2d: Sequence[int], n: int = 3) -> List[list]:
    """The ``n`` best-scoring predicted instances over all images (fewer if an empty mask comes
    first), as GT ``[(mask, dataset category)]`` per image: every prediction scored above a GT
    one is one, so AP is 100."""
    ranked = sorted(((s, k, m, c) for k, p in enumerate(preds) for m, c, s in p.inst), key=lambda r: -r[0])
    gts = [[] for _ in preds]
    for _, k, m, c in ranked[:n]:
        if not m.any():
            break
        gts[k].append((m, c2d[c]))
    assert any(gts), "the tiny model predicted no instance with a non-empty mask"
    return gts
