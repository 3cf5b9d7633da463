"""The standard benchmarks under their official Detectron2 / Mask2Former names and layouts.

Every dataset lives under one root folder, ``$DETECTRON2_DATASETS`` (default ``./datasets``):

    $DETECTRON2_DATASETS/
        coco/                      COCO 2017 (panoptic, instances, semantic from panoptic) and
                                   coco/coco_stuff_10k/
        ADEChallengeData2016/      ADE20K (semantic, panoptic, instance)
        ADE20K_2021_17_01/         ADE20K-full (847 classes)
        cityscapes/                Cityscapes (gtFine + leftImg8bit)
        mapillary_vistas/          Mapillary Vistas v1.2

``register_all_builtin()`` runs when :mod:`mask2former.data` is imported. Registration only
records paths: no dataset file or folder is looked at until ``DatasetCatalog.get(name)`` is
called. Then a missing file or folder raises :class:`DatasetNotFoundError`, which lists what
is missing, the expected layout of that dataset and points to ``datasets/README.md``.

The metadata of each name (``MetadataCatalog.get(name)``) combines the built-in class tables of
:mod:`mask2former.data.catalog` with the paths (``image_root``, ``panoptic_root``,
``panoptic_json``, ``sem_seg_root``, ``json_file`` as they apply) and ``evaluator_type`` /
``ignore_label``.

``register_all_builtin(root, prefix="x_")`` registers the same datasets again under another
root with prefixed names (``x_coco_2017_val_panoptic`` ...), each with the class tables of its
official name; tests use this to point the loaders at generated data.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..catalog import _BUILTIN as _BUILTIN_METADATA  # name -> builder of the class tables
from ..catalog import DatasetCatalog, MetadataCatalog
from ._common import DatasetFormatError, contiguous_segments, int_key_table, load_json
from .coco import load_coco_instances_json, load_coco_panoptic_json, load_sem_seg
from .register import _set_metadata

__all__ = [
    "DatasetNotFoundError",
    "datasets_root",
    "builtin_dataset_names",
    "register_all_builtin",
    "load_cityscapes_semantic",
    "load_cityscapes_instances",
    "load_cityscapes_panoptic",
]

logger = logging.getLogger(__name__)

README = "datasets/README.md"


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset's files are not where its layout says they should be."""


def datasets_root(root: Optional[str] = None) -> str:
    """``root``, else ``$DETECTRON2_DATASETS``, else ``datasets`` (relative to the working
    directory, as in Detectron2), with ``~`` expanded."""
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.expanduser(str(root))


# ----------------------------------------------------------------------------- layouts
# Shown (with the dataset's own paths) when a dataset is used but its files are missing.
_LAYOUTS = {
    "coco": """\
coco/
  train2017/, val2017/                    images (*.jpg)
  panoptic_train2017/, panoptic_val2017/  panoptic PNGs (from panoptic_annotations_trainval2017.zip)
  panoptic_semseg_train2017/, panoptic_semseg_val2017/
                                          semantic PNGs made from the panoptic ones
                                          (python -m mask2former.data.prepare coco_panoptic_semseg)
  annotations/
    panoptic_train2017.json, panoptic_val2017.json
    instances_train2017.json, instances_val2017.json""",
    "coco_stuff_10k": """\
coco/coco_stuff_10k/
  images_detectron2/{train,test}/         images (*.jpg)
  annotations_detectron2/{train,test}/    label PNGs (171 contiguous ids, 255 = ignore)
                                          (python -m mask2former.data.prepare coco_stuff_10k)""",
    "ade20k": """\
ADEChallengeData2016/
  images/{training,validation}/           images (ADE_*.jpg)
  annotations/{training,validation}/      official label PNGs (0 = other, 1..150 = classes)
  annotations_detectron2/{training,validation}/
                                          labels - 1, 0 -> 255
                                          (python -m mask2former.data.prepare ade20k_sem_seg)
  ade20k_panoptic_{train,val}.json        panoptic annotations   (python -m mask2former.data.prepare
  ade20k_panoptic_{train,val}/            panoptic PNGs           ade20k_panoptic)
  ade20k_instance_{train,val}.json        COCO-format instances  (... prepare ade20k_instance)""",
    "ade20k_full": """\
ADE20K_2021_17_01/
  images_detectron2/{training,validation}/       images (*.jpg)
  annotations_detectron2/{training,validation}/  16-bit TIFF labels (847 classes, 65535 = ignore)
                                          (python -m mask2former.data.prepare ade20k_full)""",
    "cityscapes": """\
cityscapes/
  leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds}.png
                                          (from gtFine_trainvaltest.zip)
  gtFine/.../*_gtFine_labelTrainIds.png   made by cityscapesscripts' createTrainIdLabelImgs.py
  gtFine/cityscapes_panoptic_{train,val}.json, gtFine/cityscapes_panoptic_{train,val}/
                                          made by cityscapesscripts' createPanopticImgs.py""",
    "mapillary_vistas": """\
mapillary_vistas/
  training/, validation/
    images/                               images (*.jpg)
    labels/                               semantic PNGs (65 classes, 65 = unlabeled)
    panoptic/panoptic_2018.json           panoptic annotations
    panoptic/*.png                        panoptic PNGs""",
}


def _missing_error(name: str, root: str, layout_key: str,
                   missing: Sequence[Tuple[str, str]]) -> DatasetNotFoundError:
    lines = [f"Dataset {name!r} is registered, but its files are not there:"]
    lines += [f"  {role}: {os.path.abspath(path)}" for role, path in missing]
    lines.append(f"Expected layout under the datasets root {os.path.abspath(root)!r} "
                 "($DETECTRON2_DATASETS, default ./datasets):")
    lines += ["  " + line for line in _LAYOUTS[layout_key].splitlines()]
    lines.append(f"See {README} for where to download the dataset and how to prepare it, and set "
                 "DETECTRON2_DATASETS to the folder that holds it.")
    return DatasetNotFoundError("\n".join(lines))


def _checked(name: str, root: str, layout_key: str, required: Sequence[Tuple[str, str]],
             load: Callable[[], List[dict]]) -> Callable[[], List[dict]]:
    """A loader that first checks that every ``(role, path)`` in ``required`` exists."""

    def loader() -> List[dict]:
        missing = [(role, path) for role, path in required if not os.path.exists(path)]
        if missing:
            raise _missing_error(name, root, layout_key, missing)
        return load()

    loader.__name__ = f"load_{name}"
    return loader


# ----------------------------------------------------------------------------- Cityscapes
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
            + _LAYOUTS["cityscapes"] + f"\nSee {README}.")
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
    from PIL import Image
    import pycocotools.mask as mask_util

    with Image.open(inst_file) as im:
        ids = np.asarray(im).astype(np.int64)
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
                     _LAYOUTS["cityscapes"] + f"\nSee {README}.")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DatasetFormatError(f"{gt_json}: expected an object with an 'annotations' list")
    images = {base: (f, city) for f, city, base in _cityscapes_images(image_dir)}
    things = int_key_table(meta.get("thing_dataset_id_to_contiguous_id"))
    stuff = int_key_table(meta.get("stuff_dataset_id_to_contiguous_id"))
    sem_dir = os.path.join(os.path.dirname(os.path.normpath(gt_dir)),
                           os.path.basename(os.path.normpath(image_dir)))
    ret = []
    for k, ann in enumerate(data["annotations"]):
        try:
            image_id, png, segs = ann["image_id"], ann["file_name"], ann["segments_info"]
        except (KeyError, TypeError) as e:
            raise DatasetFormatError(
                f"{gt_json}: annotation #{k} lacks {e} (needs image_id, file_name, segments_info)"
            ) from None
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
    if not ret:
        raise DatasetFormatError(f"{gt_json}: no annotations")
    logger.info("Loaded %d Cityscapes panoptic images from %s", len(ret), gt_json)
    return ret


# ----------------------------------------------------------------------------- the table
class _Spec:
    """One built-in dataset: its official name, loader kind, paths relative to the root."""

    def __init__(self, name: str, kind: str, layout: str, **paths: Any):
        self.name, self.kind, self.layout, self.paths = name, kind, layout, paths


def _specs() -> List[_Spec]:
    s: List[_Spec] = []
    for split in ("train", "val"):
        images = f"coco/{split}2017"
        instances = f"coco/annotations/instances_{split}2017.json"
        s.append(_Spec(f"coco_2017_{split}", "coco_instances", "coco",
                       image_root=images, json_file=instances))
        pan = dict(image_root=images, panoptic_root=f"coco/panoptic_{split}2017",
                   panoptic_json=f"coco/annotations/panoptic_{split}2017.json", json_file=instances)
        s.append(_Spec(f"coco_2017_{split}_panoptic", "coco_panoptic", "coco", **pan))
        s.append(_Spec(f"coco_2017_{split}_panoptic_with_sem_seg", "coco_panoptic", "coco",
                       sem_seg_root=f"coco/panoptic_semseg_{split}2017", **pan))
    for split in ("train", "test"):
        s.append(_Spec(f"coco_2017_{split}_stuff_10k_sem_seg", "sem_seg", "coco_stuff_10k",
                       image_root=f"coco/coco_stuff_10k/images_detectron2/{split}",
                       sem_seg_root=f"coco/coco_stuff_10k/annotations_detectron2/{split}",
                       image_ext="jpg", gt_ext="png"))
    for split, d in (("train", "training"), ("val", "validation")):
        ade = "ADEChallengeData2016"
        s.append(_Spec(f"ade20k_sem_seg_{split}", "sem_seg", "ade20k",
                       image_root=f"{ade}/images/{d}", sem_seg_root=f"{ade}/annotations_detectron2/{d}",
                       image_ext="jpg", gt_ext="png"))
        s.append(_Spec(f"ade20k_panoptic_{split}", "coco_panoptic", "ade20k",
                       image_root=f"{ade}/images/{d}", panoptic_root=f"{ade}/ade20k_panoptic_{split}",
                       panoptic_json=f"{ade}/ade20k_panoptic_{split}.json",
                       sem_seg_root=f"{ade}/annotations_detectron2/{d}",
                       json_file=f"{ade}/ade20k_instance_{split}.json"))
        s.append(_Spec(f"ade20k_instance_{split}", "coco_instances", "ade20k",
                       image_root=f"{ade}/images/{d}", json_file=f"{ade}/ade20k_instance_{split}.json"))
        full = "ADE20K_2021_17_01"
        s.append(_Spec(f"ade20k_full_sem_seg_{split}", "sem_seg", "ade20k_full",
                       image_root=f"{full}/images_detectron2/{d}",
                       sem_seg_root=f"{full}/annotations_detectron2/{d}",
                       image_ext="jpg", gt_ext="tif"))
        mv = f"mapillary_vistas/{d}"
        s.append(_Spec(f"mapillary_vistas_sem_seg_{split}", "sem_seg", "mapillary_vistas",
                       image_root=f"{mv}/images", sem_seg_root=f"{mv}/labels",
                       image_ext="jpg", gt_ext="png"))
        s.append(_Spec(f"mapillary_vistas_panoptic_{split}", "coco_panoptic", "mapillary_vistas",
                       image_root=f"{mv}/images", panoptic_root=f"{mv}/panoptic",
                       panoptic_json=f"{mv}/panoptic/panoptic_2018.json",
                       sem_seg_root=f"{mv}/labels"))
    for split in ("train", "val", "test"):
        cs = dict(image_dir=f"cityscapes/leftImg8bit/{split}", gt_dir=f"cityscapes/gtFine/{split}")
        s.append(_Spec(f"cityscapes_fine_sem_seg_{split}", "cityscapes_sem_seg", "cityscapes", **cs))
        s.append(_Spec(f"cityscapes_fine_instance_seg_{split}", "cityscapes_instance", "cityscapes",
                       **cs))
    for split in ("train", "val"):
        s.append(_Spec(f"cityscapes_fine_panoptic_{split}", "cityscapes_panoptic", "cityscapes",
                       image_root=f"cityscapes/leftImg8bit/{split}",
                       panoptic_root=f"cityscapes/gtFine/cityscapes_panoptic_{split}",
                       panoptic_json=f"cityscapes/gtFine/cityscapes_panoptic_{split}.json",
                       gt_dir=f"cityscapes/gtFine/{split}"))
    return s


_ROLES = {
    "image_root": "image folder (image_root)",
    "image_dir": "image folder",
    "panoptic_root": "panoptic PNG folder (panoptic_root)",
    "panoptic_json": "panoptic annotation file (panoptic_json)",
    "sem_seg_root": "semantic label folder (sem_seg_root)",
    "json_file": "instance annotation file (json_file)",
    "gt_dir": "ground-truth folder (gtFine/<split>)",
}


def builtin_dataset_names() -> List[str]:
    """The official names that :func:`register_all_builtin` registers."""
    return [spec.name for spec in _specs()]


def _register(spec: _Spec, name: str, root: str) -> None:
    p = {k: (os.path.join(root, v) if k not in ("image_ext", "gt_ext") else v)
         for k, v in spec.paths.items()}
    tables = _BUILTIN_METADATA[spec.name]()  # the official name's class tables
    kind = spec.kind
    if kind == "coco_panoptic":
        # the instances json only serves the instance evaluation, so it is not required here
        required = [(_ROLES[k], p[k]) for k in ("image_root", "panoptic_root", "panoptic_json",
                                                  "sem_seg_root") if k in p]
        load = lambda: load_coco_panoptic_json(p["panoptic_json"], p["image_root"],  # noqa: E731
                                               p["panoptic_root"], MetadataCatalog.get(name),
                                               p.get("sem_seg_root"))
        paths = {k: p.get(k) for k in ("image_root", "panoptic_root", "panoptic_json",
                                       "sem_seg_root", "json_file")}
        defaults = dict(evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000)
    elif kind == "coco_instances":
        required = [(_ROLES[k], p[k]) for k in ("image_root", "json_file")]
        load = lambda: load_coco_instances_json(p["json_file"], p["image_root"],  # noqa: E731
                                                MetadataCatalog.get(name), name)
        paths = {"image_root": p["image_root"], "json_file": p["json_file"]}
        defaults = dict(evaluator_type="coco")
    elif kind == "sem_seg":
        required = [(_ROLES[k], p[k]) for k in ("image_root", "sem_seg_root")]
        load = lambda: load_sem_seg(p["sem_seg_root"], p["image_root"],  # noqa: E731
                                    gt_ext=p["gt_ext"], image_ext=p["image_ext"])
        paths = {"image_root": p["image_root"], "sem_seg_root": p["sem_seg_root"]}
        defaults = dict(evaluator_type="sem_seg", ignore_label=255)
    elif kind in ("cityscapes_sem_seg", "cityscapes_instance"):
        required = [(_ROLES["image_dir"], p["image_dir"]), (_ROLES["gt_dir"], p["gt_dir"])]
        if kind == "cityscapes_sem_seg":
            load = lambda: load_cityscapes_semantic(p["image_dir"], p["gt_dir"])  # noqa: E731
        else:
            load = lambda: load_cityscapes_instances(p["image_dir"], p["gt_dir"])  # noqa: E731
        # Detectron2 names these image_dir / gt_dir; image_root / sem_seg_root are given too
        paths = {"image_dir": p["image_dir"], "gt_dir": p["gt_dir"], "image_root": p["image_dir"]}
        if kind == "cityscapes_sem_seg":
            paths["sem_seg_root"] = p["gt_dir"]
        defaults = {}
    elif kind == "cityscapes_panoptic":
        required = [(_ROLES[k], p[k]) for k in ("image_root", "panoptic_root", "panoptic_json")]
        load = lambda: load_cityscapes_panoptic(p["image_root"], p["panoptic_root"],  # noqa: E731
                                                p["panoptic_json"], MetadataCatalog.get(name))
        paths = {k: p[k] for k in ("image_root", "panoptic_root", "panoptic_json", "gt_dir")}
        defaults = dict(evaluator_type="cityscapes_panoptic_seg", ignore_label=255,
                        label_divisor=1000)
    else:  # pragma: no cover - the table above only uses the kinds handled here
        raise AssertionError(kind)

    DatasetCatalog.register(name, _checked(name, root, spec.layout, required, load))
    # class tables (equal to what MetadataCatalog already has for an official name) + paths
    defaults = {k: v for k, v in defaults.items() if k not in tables}
    _set_metadata(name, paths, defaults, tables)


def register_all_builtin(root: Optional[str] = None, prefix: str = "",
                         names: Optional[Iterable[str]] = None) -> List[str]:
    """Register the built-in datasets under ``root`` (default: :func:`datasets_root`).

    Args:
        root: the folder holding ``coco/``, ``ADEChallengeData2016/``, ``cityscapes/`` ...
        prefix: registered names are ``prefix + official name`` (with the official name's class
            tables); "" registers the official names themselves.
        names: only these official names (default: all of :func:`builtin_dataset_names`).

    Names already in :data:`DatasetCatalog` are left as they are. Nothing is read from ``root``.
    Returns the names registered by this call.
    """
    root = datasets_root(root)
    wanted = None if names is None else set(names)
    if wanted is not None:
        unknown = wanted - set(builtin_dataset_names())
        if unknown:
            raise KeyError(f"not built-in dataset names: {sorted(unknown)}; "
                           f"known: {builtin_dataset_names()}")
    done = []
    for spec in _specs():
        if wanted is not None and spec.name not in wanted:
            continue
        name = prefix + spec.name
        if name in DatasetCatalog:
            continue
        _register(spec, name, root)
        done.append(name)
    return done
