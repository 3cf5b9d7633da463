"""The COCO family: COCO 2017 panoptic and instances, the semantic PNGs made from the panoptic
ones, and COCO-Stuff-10k.

* ``METADATA``: ``coco_{2014,2017}_*`` instances (80 things), ``coco_2017_{train,val}_panoptic``
  and ``..._panoptic_with_sem_seg`` (133 classes), ``coco_2017_{train,test}_stuff_10k_sem_seg``
  (171 classes), built from ``metadata/coco_panoptic.json`` and ``metadata/coco_stuff_171.json``.
* ``SPECS``: those datasets under ``$DETECTRON2_DATASETS/coco/`` (layouts :data:`LAYOUT`,
  :data:`STUFF_10K_LAYOUT`).
* ``PREPARE``: ``coco_panoptic_semseg`` (:func:`convert_coco_panoptic_semseg`) and
  ``coco_stuff_10k`` (:func:`convert_coco_stuff_10k`).

The COCO-format loaders every family uses live in :mod:`.formats`; they are re-exported here,
their former home.
"""
from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..catalog import builtin_categories
from ..ids import category_table, rgb2id
from ._common import (
    datasets_root,
    instances_metadata,
    load_json,
    panoptic_metadata,
    read_array,
    run_jobs,
)
from .formats import (  # noqa: F401 (their former home)
    XYWH_ABS,
    load_coco_instances_json,
    load_coco_panoptic_json,
    load_sem_seg,
)
from .register import DatasetSpec, coco_instances_spec, coco_panoptic_spec, sem_seg_spec

__all__ = ["load_coco_panoptic_json", "load_coco_instances_json", "load_sem_seg",
           "panoptic_to_semantic", "convert_coco_panoptic_semseg", "coco_stuff_10k_labels",
           "read_coco_stuff_10k_mat", "convert_coco_stuff_10k", "METADATA", "SPECS", "PREPARE"]

# Shown (with the dataset's own paths) when a dataset is used but its files are missing.
LAYOUT = """\
coco/
  train2017/, val2017/                    images (*.jpg)
  panoptic_train2017/, panoptic_val2017/  panoptic PNGs (from panoptic_annotations_trainval2017.zip)
  panoptic_semseg_train2017/, panoptic_semseg_val2017/
                                          semantic PNGs made from the panoptic ones
                                          (python -m mask2former.data.prepare coco_panoptic_semseg)
  annotations/
    panoptic_train2017.json, panoptic_val2017.json
    instances_train2017.json, instances_val2017.json"""

STUFF_10K_LAYOUT = """\
coco/coco_stuff_10k/
  images_detectron2/{train,test}/         images (*.jpg)
  annotations_detectron2/{train,test}/    label PNGs (171 contiguous ids, 255 = ignore)
                                          (python -m mask2former.data.prepare coco_stuff_10k)"""


# ----------------------------------------------------------------------------- metadata
def _coco_instances() -> dict:
    meta = instances_metadata([c for c in builtin_categories("coco_panoptic") if c["isthing"]])
    meta.update(evaluator_type="coco")
    return meta


def _coco_panoptic(with_sem_seg: bool) -> dict:
    # Mask2Former: thing_classes/thing_colors hold only the 80 things, stuff_* all 133.
    # The plain split keeps a stuff-only stuff table; "_with_sem_seg" maps all 133
    # (so that the semantic-segmentation evaluator can be used too).
    meta = panoptic_metadata(builtin_categories("coco_panoptic"), stuff_table_all=with_sem_seg)
    meta.update(evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000)
    return meta


def _coco_stuff_10k() -> dict:
    cats = builtin_categories("coco_stuff_171")
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        "evaluator_type": "sem_seg",
        "ignore_label": 255,
    }


METADATA = {name: _coco_instances for name in (
    "coco_2014_train", "coco_2014_val", "coco_2014_minival", "coco_2014_valminusminival",
    "coco_2017_train", "coco_2017_val", "coco_2017_test", "coco_2017_test-dev", "coco_2017_val_100",
)}
METADATA.update({f"coco_2017_{split}_panoptic{suffix}": partial(_coco_panoptic, bool(suffix))
                 for split in ("train", "val") for suffix in ("", "_with_sem_seg")})
METADATA.update({f"coco_2017_{split}_stuff_10k_sem_seg": _coco_stuff_10k
                 for split in ("train", "test")})


# ----------------------------------------------------------------------------- datasets
def _specs() -> List[DatasetSpec]:
    s = []
    for split in ("train", "val"):
        images = f"coco/{split}2017"
        instances = f"coco/annotations/instances_{split}2017.json"
        s.append(coco_instances_spec(f"coco_2017_{split}", LAYOUT, images, instances))
        pan = dict(image_root=images, panoptic_root=f"coco/panoptic_{split}2017",
                   panoptic_json=f"coco/annotations/panoptic_{split}2017.json", json_file=instances)
        s.append(coco_panoptic_spec(f"coco_2017_{split}_panoptic", LAYOUT, **pan))
        s.append(coco_panoptic_spec(f"coco_2017_{split}_panoptic_with_sem_seg", LAYOUT,
                                    sem_seg_root=f"coco/panoptic_semseg_{split}2017", **pan))
    for split in ("train", "test"):
        s.append(sem_seg_spec(f"coco_2017_{split}_stuff_10k_sem_seg", STUFF_10K_LAYOUT,
                              f"coco/coco_stuff_10k/images_detectron2/{split}",
                              f"coco/coco_stuff_10k/annotations_detectron2/{split}"))
    return s


SPECS = _specs()


# ----------------------------------------------------------------------------- panoptic -> semantic
def panoptic_to_semantic(pan_rgb: np.ndarray, segments: Iterable[dict],
                         id_map: Dict[int, int], ignore_label: int = 255) -> np.ndarray:
    """Semantic label map of a COCO panoptic PNG (H, W, 3): segment pixels get
    ``id_map[category_id]``, everything else ``ignore_label``."""
    ids = rgb2id(pan_rgb)
    out = np.full(ids.shape, ignore_label, dtype=np.uint8)
    for seg in segments:
        cat = int(seg["category_id"])
        if cat not in id_map:
            raise ValueError(f"segment {seg.get('id')} has category_id {cat}, which is not in the "
                             "category table")
        out[ids == int(seg["id"])] = id_map[cat]
    return out


def convert_coco_panoptic_semseg(root: Optional[str] = None, workers: int = 4,
                                 splits: Sequence[str] = ("val2017", "train2017")) -> List[str]:
    """``coco/panoptic_{split}/*.png`` -> ``coco/panoptic_semseg_{split}/*.png``: every pixel of
    a segment gets its category's contiguous id 0..132, unlabeled pixels 255."""
    base = os.path.join(datasets_root(root), "coco")
    id_map = category_table(_coco_panoptic(with_sem_seg=True), "stuff")
    outputs = []
    for split in splits:
        pan_json = os.path.join(base, "annotations", f"panoptic_{split}.json")
        pan_root = os.path.join(base, f"panoptic_{split}")
        dst = os.path.join(base, f"panoptic_semseg_{split}")
        hint = (f"unpack panoptic_annotations_trainval2017.zip (and the PNG zips inside it) under "
                f"{base} (see datasets/README.md)")
        for p in (pan_json, pan_root):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} not found: {hint}")
        data = load_json(pan_json, "panoptic annotation file")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{pan_json}: expected an object with an 'annotations' list")
        os.makedirs(dst, exist_ok=True)
        by_name = {a["file_name"]: a["segments_info"] for a in data["annotations"]}

        def convert(name: str, out: str) -> None:
            rgb = read_array(os.path.join(pan_root, name), hint, "RGB")
            Image.fromarray(panoptic_to_semantic(rgb, by_name[name], id_map)).save(out)

        jobs = [(name, os.path.join(dst, name)) for name in sorted(by_name)]
        run_jobs(jobs, convert, workers, f"COCO {split}")
        outputs.append(dst)
    return outputs


# ----------------------------------------------------------------------------- COCO-Stuff-10k
# cocostuff-10k v1.0 stores MATLAB indices: 1 = "unlabeled", 2..172 = the 171 classes in the
# order of the metadata (80 things, then 91 stuff); v1.1 stores 0 = "unlabeled" and the COCO
# category ids 1..182 (of which 171 are used).
_COCO_STUFF_V10_NAMES = 172
def coco_stuff_10k_labels(labels: np.ndarray, v10: bool, where: str = "labels") -> np.ndarray:
    """COCO-Stuff-10k label map -> uint8 classes 0..170 (the metadata's order), 255 = unlabeled.

    Args:
        labels: (H, W) integer label map ``S`` of a cocostuff-10k ``.mat`` file.
        v10: the v1.0 convention (1 = unlabeled, 2..172 = classes 0..170); otherwise v1.1
            (0 = unlabeled, COCO category ids, numbered in the order of the ``coco_stuff_171``
            table, as ``stuff_dataset_id_to_contiguous_id`` of the metadata does).
        where: names the source in the error for values outside the convention.
    """
    s = np.asarray(labels).astype(np.int64)
    lut = np.full(256, -1, dtype=np.int64)
    if v10:
        lut[1] = 255
        lut[2:_COCO_STUFF_V10_NAMES + 1] = np.arange(_COCO_STUFF_V10_NAMES - 1)
    else:
        lut[0] = 255
        for cid, i in category_table(_coco_stuff_10k(), "stuff").items():
            lut[cid] = i
    bad = (s < 0) | (s > 255)
    bad[~bad] = lut[s[~bad]] < 0
    if bad.any():
        vals = np.unique(s[bad])[:10].tolist()
        expected = ("1 (unlabeled) or 2..172 (v1.0)" if v10
                    else "0 (unlabeled) or a COCO-Stuff category id (v1.1)")
        raise ValueError(f"{where}: label values {vals} are not {expected}")
    return lut[s].astype(np.uint8)


def read_coco_stuff_10k_mat(path: str) -> np.ndarray:
    """The classes of a cocostuff-10k annotation file (see :func:`coco_stuff_10k_labels`).

    Classic MATLAB files are read with ``scipy.io.loadmat``; the convention is v1.0 when their
    ``names`` lists 172 classes, v1.1 otherwise. MATLAB v7.3 (HDF5) files, as in the v1.0
    release, need ``h5py`` and use the v1.0 convention.
    """
    import scipy.io

    try:
        data = scipy.io.loadmat(path, variable_names=("S", "names"))
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 (HDF5) files
        try:
            import h5py
        except ImportError:
            raise ImportError(
                f"{path} is a MATLAB v7.3 (HDF5) file, as in cocostuff-10k v1.0; reading it needs "
                "h5py (pip install h5py), or use cocostuff-10k-v1.1.zip, whose files scipy reads"
            ) from None
        with h5py.File(path, "r") as f:
            if "S" not in f:
                raise ValueError(f"{path}: no variable 'S' (the label map)") from None
            # HDF5 keeps MATLAB's column-major layout: (W, H) on disk
            return coco_stuff_10k_labels(np.asarray(f["S"]).T, True, path)
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(f"{path}: not a readable MATLAB file ({e})") from None
    if "S" not in data:
        raise ValueError(f"{path}: no variable 'S' (the label map); variables: "
                         f"{sorted(v[0] for v in scipy.io.whosmat(path))}")
    names = data.get("names")
    v10 = names is not None and np.size(names) == _COCO_STUFF_V10_NAMES
    s = data["S"]
    if s.ndim != 2:
        raise ValueError(f"{path}: 'S' must be a 2-D label map; got shape {s.shape}")
    return coco_stuff_10k_labels(s, v10, path)


def convert_coco_stuff_10k(root: Optional[str] = None, workers: int = 4) -> List[str]:
    """``coco/coco_stuff_10k/{images,annotations,imageLists}`` -> ``images_detectron2/{train,test}``
    (copies) and ``annotations_detectron2/{train,test}/*.png`` (classes 0..170, 255 unlabeled)."""
    base = os.path.join(datasets_root(root), "coco", "coco_stuff_10k")
    hint = ("unzip cocostuff-10k-v1.1.zip (or v1.0) into coco/coco_stuff_10k/ so that it holds "
            "images/, annotations/ and imageLists/ (see datasets/README.md)")
    outputs = []
    for split in ("train", "test"):
        list_file = os.path.join(base, "imageLists", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"{list_file} not found: {hint}")
        with open(list_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        img_out = os.path.join(base, "images_detectron2", split)
        lab_out = os.path.join(base, "annotations_detectron2", split)
        os.makedirs(img_out, exist_ok=True)
        os.makedirs(lab_out, exist_ok=True)

        def convert(name: str) -> None:
            image = os.path.join(base, "images", name + ".jpg")
            mat = os.path.join(base, "annotations", name + ".mat")
            for p in (image, mat):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{p} (listed in {list_file}) not found: {hint}")
            labels = read_coco_stuff_10k_mat(mat)
            with Image.open(image) as im:  # the header only: the copy is byte for byte
                w, h = im.size
            if labels.shape != (h, w):
                raise ValueError(f"{mat}: the label map is {labels.shape[0]}x{labels.shape[1]} but "
                                 f"{image} is {h}x{w}")
            shutil.copyfile(image, os.path.join(img_out, name + ".jpg"))
            Image.fromarray(labels).save(os.path.join(lab_out, name + ".png"))

        run_jobs([(n,) for n in names], convert, workers, f"COCO-Stuff-10k {split}")
        outputs += [img_out, lab_out]
    return outputs


PREPARE = {"coco_panoptic_semseg": convert_coco_panoptic_semseg,
           "coco_stuff_10k": convert_coco_stuff_10k}
