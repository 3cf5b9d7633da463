"""A small synthetic panoptic dataset that a laptop CPU can train on in minutes.

Each 128x128 image shows a textured "sky" above a textured "grass" region (stuff), split by a
wavy horizon, with 1-6 possibly overlapping circles, squares and triangles (things) of random
size and colour; a shape's class is its geometry, never its colour. Ground truth is written in
the layouts of the real benchmarks, so the same loaders and evaluators serve both:

    <root>/synthetic/
        {train,val}2017/<id>.png                          images
        annotations/panoptic_{train,val}2017.json         COCO panoptic
        annotations/panoptic_{train,val}2017/<id>.png     panoptic PNGs (id = R + 256 G + 256^2 B)
        annotations/instances_{train,val}2017.json        COCO instances (RLE)
        panoptic_semseg_{train,val}2017/<id>.png          semantic PNGs (contiguous ids, 255 = ignore)

Generation is deterministic (a fixed seed per split) and atomic: the tree is written to a
temporary directory and renamed into place, so an interrupted run leaves nothing half-made.
"""
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from ..ids import id2rgb
from . import _common

logger = logging.getLogger(__name__)

VERSION = 1
IMAGE_SIZE = 128
SPLITS = {"train": 1000, "val": 100}
MIN_VISIBLE_AREA = 24  # occluded remnants smaller than this become VOID, not instances

# id, name, isthing, colour used by visualisations (not by the images)
CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 130, 200]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [255, 200, 0]},
    {"id": 4, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
    {"id": 5, "name": "grass", "isthing": 0, "color": [34, 139, 34]},
]
_SEEDS = {"train": 20260101, "val": 20260202}


def synthetic_root(datasets_root: Optional[str] = None) -> str:
    """``$DETECTRON2_DATASETS/synthetic`` (default ``./datasets/synthetic``)."""
    return os.path.join(_common.datasets_root(datasets_root or None), "synthetic")


def split_paths(root: str, split: str) -> Dict[str, str]:
    return {
        "image_root": os.path.join(root, f"{split}2017"),
        "panoptic_json": os.path.join(root, "annotations", f"panoptic_{split}2017.json"),
        "panoptic_root": os.path.join(root, "annotations", f"panoptic_{split}2017"),
        "instances_json": os.path.join(root, "annotations", f"instances_{split}2017.json"),
        "sem_seg_root": os.path.join(root, f"panoptic_semseg_{split}2017"),
    }


def metadata() -> dict:
    """Category tables in the COCO-panoptic convention used by the built-in datasets (colours
    as tuples)."""
    meta = _common.panoptic_metadata([dict(c, color=tuple(c["color"])) for c in CATEGORIES])
    meta.update(ignore_label=255, label_divisor=1000)
    return meta


# ------------------------------------------------------------------------------------ drawing
def _texture_sky(rng, h, w):
    y = np.linspace(0, 1, h)[:, None, None]
    top, bottom = np.array([70, 120, 210]), np.array([170, 210, 245])
    base = top + (bottom - top) * y
    noise = rng.normal(0, 6, (h, w, 1))
    return np.broadcast_to(base, (h, w, 3)) + noise


def _texture_grass(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.uniform(5, 9)
    stripes = 0.5 + 0.5 * np.sin((xx + yy * rng.uniform(0.3, 1.2)) * 2 * np.pi / period)
    base = np.array([40, 120, 40]) + stripes[..., None] * np.array([30, 60, 20])
    return base + rng.normal(0, 8, (h, w, 1))


def _shape_mask(rng, kind: str, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    r = rng.uniform(7, 26)
    cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # upright isosceles triangle: apex at the top, base at the bottom
    top, bottom = cy - r, cy + r * 0.8
    t = np.clip((yy - top) / (bottom - top), 0, None)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * r)


def _random_colour(rng) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))) * 255


def render_sample(rng, size: int = IMAGE_SIZE):
    """One image: returns (image HxWx3 uint8, segment map HxW int32 (0 = VOID), segments list of
    {"id", "category_id"})."""
    h = w = size
    xx = np.arange(w)
    horizon = size * rng.uniform(0.3, 0.7) + rng.uniform(3, 10) * np.sin(
        xx * 2 * np.pi / rng.uniform(40, 120) + rng.uniform(0, 2 * np.pi))
    sky = np.arange(h)[:, None] < horizon[None, :]
    image = np.where(sky[..., None], _texture_sky(rng, h, w), _texture_grass(rng, h, w))
    seg = np.where(sky, 4000, 5000).astype(np.int32)  # stuff segment ids: category * 1000
    things = []
    for n in range(int(rng.integers(1, 7))):
        cat = int(rng.integers(1, 4))
        mask = _shape_mask(rng, CATEGORIES[cat - 1]["name"], h, w)
        colour = _random_colour(rng)
        image[mask] = colour + rng.normal(0, 5, (int(mask.sum()), 3))
        seg_id = cat * 1000 + n + 1
        seg[mask] = seg_id
        things.append({"id": seg_id, "category_id": cat})
    segments = [{"id": 4000, "category_id": 4}, {"id": 5000, "category_id": 5}] + things
    for s in segments:
        area = int((seg == s["id"]).sum())
        if s["category_id"] <= 3 and 0 < area < MIN_VISIBLE_AREA:
            seg[seg == s["id"]] = 0
    present = set(np.unique(seg).tolist())
    segments = [s for s in segments if s["id"] in present]
    return np.clip(image, 0, 255).astype(np.uint8), seg, segments


def _bbox(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_split(root: str, split: str, count: int) -> None:
    from pycocotools import mask as mask_util

    paths = split_paths(root, split)
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    os.makedirs(os.path.dirname(paths["panoptic_json"]), exist_ok=True)
    contiguous = metadata()["stuff_dataset_id_to_contiguous_id"]
    rng = np.random.default_rng(_SEEDS[split])
    images, pan_anns, ins_anns = [], [], []
    for image_id in range(1, count + 1):
        image, seg, segments = render_sample(rng)
        name = f"{image_id:06d}"
        Image.fromarray(image).save(os.path.join(paths["image_root"], name + ".png"))
        Image.fromarray(id2rgb(seg)).save(os.path.join(paths["panoptic_root"], name + ".png"))
        sem = np.full(seg.shape, 255, np.uint8)
        infos = []
        for s in segments:
            m = seg == s["id"]
            sem[m] = contiguous[s["category_id"]]
            info = {"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "area": int(m.sum()),
                    "bbox": _bbox(m)}
            infos.append(info)
            if s["category_id"] <= 3:
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                ins_anns.append({"id": len(ins_anns) + 1, "image_id": image_id, "category_id": s["category_id"],
                                 "segmentation": rle, "area": info["area"], "bbox": info["bbox"], "iscrowd": 0})
        Image.fromarray(sem).save(os.path.join(paths["sem_seg_root"], name + ".png"))
        h, w = seg.shape
        images.append({"id": image_id, "file_name": name + ".png", "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": name + ".png", "segments_info": infos})
    categories = [dict(c, supercategory="shape" if c["isthing"] else "background") for c in CATEGORIES]
    with open(paths["panoptic_json"], "w") as f:
        json.dump({"images": images, "annotations": pan_anns, "categories": categories}, f)
    with open(paths["instances_json"], "w") as f:
        json.dump({"images": images, "annotations": ins_anns,
                   "categories": [c for c in categories if c["isthing"]]}, f)


def ensure_synthetic_dataset(datasets_root: Optional[str] = None, splits: Optional[Dict[str, int]] = None) -> str:
    """Generate the dataset under ``synthetic_root(datasets_root)`` unless it is already there
    (and of the current VERSION). Returns the root."""
    root = synthetic_root(datasets_root)
    marker = os.path.join(root, "VERSION")
    splits = splits or SPLITS
    if os.path.isfile(marker) and open(marker).read().strip() == str(VERSION):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    logger.info("Generating the synthetic dataset under %s (%s images)", root,
                ", ".join(f"{k} {v}" for k, v in splits.items()))
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        for split, count in splits.items():
            _write_split(tmp, split, count)
        with open(os.path.join(tmp, "VERSION"), "w") as f:
            f.write(str(VERSION))
        if os.path.exists(root):
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished first: keep its copy
            if not os.path.isfile(marker):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def register_synthetic(datasets_root: Optional[str] = None) -> None:
    """Register ``synthetic_panoptic_{train,val}``; the files are generated on first use."""
    from ..catalog import DatasetCatalog
    from .register import register_coco_panoptic

    root = synthetic_root(datasets_root)
    for split in SPLITS:
        name = f"synthetic_panoptic_{split}"
        if name in DatasetCatalog:
            continue
        p = split_paths(root, split)
        register_coco_panoptic(name, metadata(), p["image_root"], p["panoptic_root"], p["panoptic_json"],
                               sem_seg_root=p["sem_seg_root"], instances_json=p["instances_json"],
                               prepare=lambda: ensure_synthetic_dataset(datasets_root))
