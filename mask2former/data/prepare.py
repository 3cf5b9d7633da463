"""Conversions that turn downloaded benchmark archives into the layouts the loaders expect.

    python -m mask2former.data.prepare TASK [--root DIR] [--workers N]

``--root`` defaults to ``$DETECTRON2_DATASETS`` (else ``./datasets``). Existing outputs are
overwritten. Cityscapes needs the official cityscapesscripts instead (see ``datasets/README.md``).
The tasks (each reads only files of the user's download; the class tables are the package's
built-in metadata):

* ``ade20k_sem_seg``: ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = "other",
  1..150 = classes) -> ``annotations_detectron2/...``: each label minus one, so that the classes
  are 0..149 and "other" becomes the ignore label 255.
* ``coco_panoptic_semseg``: ``coco/panoptic_{train,val}2017/*.png`` with
  ``coco/annotations/panoptic_{train,val}2017.json`` -> ``coco/panoptic_semseg_{train,val}2017/``:
  every pixel of a segment gets its category's contiguous id (0..132, the order of the COCO
  panoptic categories; crowd regions included), unlabeled pixels 255.
* ``coco_stuff_10k``: ``coco/coco_stuff_10k/{images/*.jpg, annotations/*.mat,
  imageLists/{train,test}.txt}`` (cocostuff-10k v1.0 or v1.1) ->
  ``images_detectron2/{train,test}/*.jpg`` (copies) and ``annotations_detectron2/{train,test}/*.png``
  with the 171 classes as 0..170 (see :func:`coco_stuff_10k_labels`) and 255 for "unlabeled".
* ``ade20k_full``: ``ADE20K_2021_17_01/images/**/<name>.jpg`` with ``<name>_seg.png`` ->
  ``images_detectron2/{training,validation}/<name>.jpg`` and
  ``annotations_detectron2/{training,validation}/<name>.tif`` (see :func:`ade20k_full_labels`),
  the shorter side brought down to 512 pixels when longer.
* ``ade20k_panoptic``: ``ADEChallengeData2016/annotations/`` with ``annotations_instance/``
  (from ``annotations_instance.tar`` of the 2017 Places challenge) ->
  ``ade20k_panoptic_{train,val}/*.png`` and ``ade20k_panoptic_{train,val}.json`` (see
  :func:`ade20k_panoptic_of`).
* ``ade20k_instance``: ``annotations_instance/`` -> ``ade20k_instance_{train,val}.json``, COCO
  instances with RLE masks and the ADE20K-150 class ids of the 100 instance classes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .datasets.builtin import datasets_root

__all__ = ["ade20k_label_to_detectron2", "convert_ade20k_sem_seg", "panoptic_to_semantic",
           "convert_coco_panoptic_semseg", "coco_stuff_10k_labels", "read_coco_stuff_10k_mat",
           "convert_coco_stuff_10k", "ade20k_full_labels", "convert_ade20k_full",
           "ade20k_instance_masks", "ade20k_panoptic_of", "convert_ade20k_panoptic",
           "ade20k_instance_annotations", "convert_ade20k_instance", "main"]


def ade20k_label_to_detectron2(label: np.ndarray) -> np.ndarray:
    """ADE20K label map (uint8, 0 = other) -> classes 0..149 with 255 for "other"."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f"ADE20K labels must be 8-bit; got {label.dtype}")
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255


def panoptic_to_semantic(pan_rgb: np.ndarray, segments: Iterable[dict],
                         id_map: Dict[int, int], ignore_label: int = 255) -> np.ndarray:
    """Semantic label map of a COCO panoptic PNG (H, W, 3): segment pixels get
    ``id_map[category_id]``, everything else ``ignore_label``."""
    rgb = np.asarray(pan_rgb).astype(np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    out = np.full(ids.shape, ignore_label, dtype=np.uint8)
    for seg in segments:
        cat = int(seg["category_id"])
        if cat not in id_map:
            raise ValueError(f"segment {seg.get('id')} has category_id {cat}, which is not in the "
                             "category table")
        out[ids == int(seg["id"])] = id_map[cat]
    return out


def _run(jobs: Sequence[Tuple[Any, ...]], fn: Callable[..., Any], workers: int,
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


def convert_ade20k_sem_seg(root: Optional[str] = None, workers: int = 4) -> List[str]:
    base = os.path.join(datasets_root(root), "ADEChallengeData2016")
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
            with Image.open(a) as im:
                Image.fromarray(ade20k_label_to_detectron2(np.asarray(im))).save(b)

        _run(jobs, convert, workers, f"ADE20K {split}")
        outputs.append(dst)
    return outputs


def convert_coco_panoptic_semseg(root: Optional[str] = None, workers: int = 4,
                                 splits: Sequence[str] = ("val2017", "train2017")) -> List[str]:
    from .catalog import MetadataCatalog

    base = os.path.join(datasets_root(root), "coco")
    table = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg").stuff_dataset_id_to_contiguous_id
    id_map = {int(k): int(v) for k, v in table.items()}
    outputs = []
    for split in splits:
        pan_json = os.path.join(base, "annotations", f"panoptic_{split}.json")
        pan_root = os.path.join(base, f"panoptic_{split}")
        dst = os.path.join(base, f"panoptic_semseg_{split}")
        for p in (pan_json, pan_root):
            if not os.path.exists(p):
                raise FileNotFoundError(
                    f"{p} not found: unpack panoptic_annotations_trainval2017.zip (and the PNG zips "
                    f"inside it) under {base} (see datasets/README.md)")
        with open(pan_json, encoding="utf-8") as f:
            anns = json.load(f)["annotations"]
        os.makedirs(dst, exist_ok=True)
        by_name = {a["file_name"]: a["segments_info"] for a in anns}

        def convert(name: str, out: str) -> None:
            with Image.open(os.path.join(pan_root, name)) as im:
                rgb = np.asarray(im.convert("RGB"))
            Image.fromarray(panoptic_to_semantic(rgb, by_name[name], id_map)).save(out)

        jobs = [(name, os.path.join(dst, name)) for name in sorted(by_name)]
        _run(jobs, convert, workers, f"COCO {split}")
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
    from .catalog import _cats

    s = np.asarray(labels).astype(np.int64)
    lut = np.full(256, -1, dtype=np.int64)
    if v10:
        lut[1] = 255
        lut[2:_COCO_STUFF_V10_NAMES + 1] = np.arange(_COCO_STUFF_V10_NAMES - 1)
    else:
        lut[0] = 255
        for i, c in enumerate(_cats("coco_stuff_171")):
            lut[int(c["id"])] = i
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
            with Image.open(image) as im:
                w, h = im.size
            if labels.shape != (h, w):
                raise ValueError(f"{mat}: the label map is {labels.shape[0]}x{labels.shape[1]} but "
                                 f"{image} is {h}x{w}")
            shutil.copyfile(image, os.path.join(img_out, name + ".jpg"))
            Image.fromarray(labels).save(os.path.join(lab_out, name + ".png"))

        _run([(n,) for n in names], convert, workers, f"COCO-Stuff-10k {split}")
        outputs += [img_out, lab_out]
    return outputs


# ----------------------------------------------------------------------------- ADE20K-full
_ADE_FULL = "ADE20K_2021_17_01"
_ADE_FULL_MAX_SHORT_SIDE = 512
_ADE_FULL_IGNORE = 65535


def ade20k_full_labels(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K-full ``*_seg.png`` (H, W, 3) -> uint16 train ids 0..846, 65535 elsewhere.

    The object class of a pixel is ``(R // 10) * 256 + G`` (the ADE20K index of ``objects.txt``);
    the 847 evaluated classes map to their train ids by the package's ``ade20k_847`` table.
    """
    from .catalog import _cats

    rgb = np.asarray(seg_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 2:
        raise ValueError(f"an ADE20K *_seg.png must be a colour image; got shape {rgb.shape}")
    cls = (rgb[..., 0].astype(np.int64) // 10) * 256 + rgb[..., 1].astype(np.int64)
    lut = np.full((255 // 10) * 256 + 256, _ADE_FULL_IGNORE, dtype=np.uint16)
    for c in _cats("ade20k_847"):
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
    import cv2

    base = os.path.join(datasets_root(root), _ADE_FULL)
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
        if not os.path.isfile(seg_file):
            raise FileNotFoundError(f"{seg_file} (the labels of {image_file}) not found")
        with Image.open(image_file) as im:
            img = np.asarray(im)
        with Image.open(seg_file) as im:
            labels = ade20k_full_labels(np.asarray(im.convert("RGB")))
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

    _run(jobs, convert, workers, "ADE20K-full")
    return [os.path.join(base, d, s) for d in ("images_detectron2", "annotations_detectron2")
            for s in ("training", "validation")]


# ----------------------------------------------------------------------------- ADE20K panoptic / instances
_ADE = "ADEChallengeData2016"
_ADE_SPLITS = (("train", "training"), ("val", "validation"))
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
    from .catalog import _cats

    ins = np.asarray(ins)
    if ins.ndim != 3 or ins.shape[2] < 2 or ins.dtype != np.uint8:
        raise ValueError(f"{where}: expected an 8-bit colour image (R = class, G = instance id); "
                         f"got {ins.dtype} of shape {ins.shape}")
    classes = [int(c["id"]) for c in _cats("ade20k_instance_100")]
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
    from .catalog import _cats

    sem = np.asarray(sem)
    if sem.ndim != 2 or sem.dtype != np.uint8:
        raise ValueError(f"{where}: the semantic labels must be an 8-bit single-channel image; "
                         f"got {sem.dtype} of shape {sem.shape}")
    if np.asarray(ins).shape[:2] != sem.shape:
        raise ValueError(f"{where}: the instance map is {ins.shape[0]}x{ins.shape[1]} but the "
                         f"semantic labels are {sem.shape[0]}x{sem.shape[1]}")
    cats = _cats("ade20k_150")
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
        raise FileNotFoundError(f"{image_dir} not found: unzip ADEChallengeData2016.zip "
                                "(see datasets/README.md)")
    names = sorted(f[: -len(".jpg")] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not names:
        raise FileNotFoundError(f"no *.jpg images in {image_dir}")
    return names


def _read_png(path: str, hint: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {hint}")
    with Image.open(path) as im:
        return np.asarray(im)


def _image_info(path: str, image_id: str) -> dict:
    with Image.open(path) as im:
        w, h = im.size
    return {"id": image_id, "file_name": os.path.basename(path), "width": w, "height": h}


def convert_ade20k_panoptic(root: Optional[str] = None, workers: int = 4) -> List[str]:
    from .catalog import _cats

    base = os.path.join(datasets_root(root), _ADE)
    categories = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": c["color"]}
                  for c in _cats("ade20k_150")]
    outputs = []
    for name, dirname in _ADE_SPLITS:
        image_dir = os.path.join(base, "images", dirname)
        names = _ade_images(image_dir)
        out_dir = os.path.join(base, f"ade20k_panoptic_{name}")
        os.makedirs(out_dir, exist_ok=True)

        def convert(stem: str) -> Tuple[dict, dict]:
            sem_file = os.path.join(base, "annotations", dirname, stem + ".png")
            ins_file = os.path.join(base, "annotations_instance", dirname, stem + ".png")
            sem = _read_png(sem_file, "unzip ADEChallengeData2016.zip (see datasets/README.md)")
            ins = _read_png(ins_file, _ADE_INSTANCE_HINT)
            image = _image_info(os.path.join(image_dir, stem + ".jpg"), stem)
            if sem.shape[:2] != (image["height"], image["width"]):
                raise ValueError(f"{sem_file} is {sem.shape[0]}x{sem.shape[1]} but the image is "
                                 f"{image['height']}x{image['width']}")
            ids, segments = ade20k_panoptic_of(sem, ins, f"{sem_file} + {ins_file}")
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(os.path.join(out_dir, stem + ".png"))
            return image, {"image_id": stem, "file_name": stem + ".png", "segments_info": segments}

        results = _run([(n,) for n in names], convert, workers, f"ADE20K panoptic {name}")
        out_json = os.path.join(base, f"ade20k_panoptic_{name}.json")
        with open(out_json, "w", encoding="utf-8") as f:
            json.dump({"images": [r[0] for r in results], "annotations": [r[1] for r in results],
                       "categories": categories}, f)
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
    from .catalog import _cats

    base = os.path.join(datasets_root(root), _ADE)
    categories = [{"id": c["id"], "name": c["name"]} for c in _cats("ade20k_instance_100")]
    outputs = []
    for name, dirname in _ADE_SPLITS:
        image_dir = os.path.join(base, "images", dirname)
        names = _ade_images(image_dir)

        def convert(stem: str) -> Tuple[dict, List[dict]]:
            ins_file = os.path.join(base, "annotations_instance", dirname, stem + ".png")
            ins = _read_png(ins_file, _ADE_INSTANCE_HINT)
            image = _image_info(os.path.join(image_dir, stem + ".jpg"), stem)
            if ins.shape[:2] != (image["height"], image["width"]):
                raise ValueError(f"{ins_file} is {ins.shape[0]}x{ins.shape[1]} but the image is "
                                 f"{image['height']}x{image['width']}")
            return image, ade20k_instance_annotations(ins, stem, ins_file)

        results = _run([(n,) for n in names], convert, workers, f"ADE20K instances {name}")
        annotations = [a for _, annos in results for a in annos]
        for i, a in enumerate(annotations):
            a["id"] = i + 1
        out_json = os.path.join(base, f"ade20k_instance_{name}.json")
        with open(out_json, "w", encoding="utf-8") as f:
            json.dump({"images": [r[0] for r in results], "annotations": annotations,
                       "categories": categories}, f)
        outputs.append(out_json)
    return outputs


_TASKS = {"ade20k_sem_seg": convert_ade20k_sem_seg,
          "coco_panoptic_semseg": convert_coco_panoptic_semseg,
          "coco_stuff_10k": convert_coco_stuff_10k,
          "ade20k_full": convert_ade20k_full,
          "ade20k_panoptic": convert_ade20k_panoptic,
          "ade20k_instance": convert_ade20k_instance}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(_TASKS))
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    args = parser.parse_args(argv)
    try:
        for out in _TASKS[args.task](args.root, args.workers):
            print(f"wrote {out}")
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
