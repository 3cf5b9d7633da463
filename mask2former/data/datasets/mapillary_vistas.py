"""The Mapillary Vistas family (v1.2, 65 classes): semantic and panoptic segmentation.

* ``METADATA``: ``mapillary_vistas_sem_seg_{train,val}`` (the evaluated classes of
  ``metadata/mapillary_vistas_sem_seg.json``) and ``mapillary_vistas_panoptic_{train,val}``
  (``metadata/mapillary_vistas_panoptic.json``); 65 ("unlabeled") is the ignore label.
* ``SPECS``: those datasets under ``$DETECTRON2_DATASETS/mapillary_vistas/`` (:data:`LAYOUT`),
  read by the COCO-format loaders of :mod:`.formats`.
* ``PREPARE``: none; the official download is used as it is.
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..catalog import builtin_categories
from ._common import panoptic_metadata
from .register import DatasetSpec, coco_panoptic_spec, sem_seg_spec

__all__ = ["LAYOUT", "METADATA", "SPECS", "PREPARE"]

# Shown (with the dataset's own paths) when a dataset is used but its files are missing.
LAYOUT = """\
mapillary_vistas/
  training/, validation/
    images/                               images (*.jpg)
    labels/                               semantic PNGs (65 classes, 65 = unlabeled)
    panoptic/panoptic_2018.json           panoptic annotations
    panoptic/*.png                        panoptic PNGs"""

_SPLITS = (("train", "training"), ("val", "validation"))  # name suffix, folder


def _sem_seg() -> dict:
    cats = [c for c in builtin_categories("mapillary_vistas_sem_seg") if c["evaluate"]]
    return {
        "stuff_classes": [c["readable"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "evaluator_type": "sem_seg",
        "ignore_label": 65,  # Mapillary Vistas uses 65 ("unlabeled") as ignore
    }


def _panoptic() -> dict:
    # As in Mask2Former, thing_classes lists all 65 classes here.
    meta = panoptic_metadata(builtin_categories("mapillary_vistas_panoptic"),
                             all_thing_classes=True)
    meta.update(
        evaluator_type="mapillary_vistas_panoptic_seg", ignore_label=65, label_divisor=1000
    )
    return meta


METADATA = {f"{kind}_{split}": builder for split, _ in _SPLITS
            for kind, builder in (("mapillary_vistas_sem_seg", _sem_seg),
                                  ("mapillary_vistas_panoptic", _panoptic))}


def _specs() -> List[DatasetSpec]:
    s = []
    for split, d in _SPLITS:
        mv = f"mapillary_vistas/{d}"
        s.append(sem_seg_spec(f"mapillary_vistas_sem_seg_{split}", LAYOUT, f"{mv}/images",
                              f"{mv}/labels"))
        s.append(coco_panoptic_spec(f"mapillary_vistas_panoptic_{split}", LAYOUT,
                                    image_root=f"{mv}/images", panoptic_root=f"{mv}/panoptic",
                                    panoptic_json=f"{mv}/panoptic/panoptic_2018.json",
                                    sem_seg_root=f"{mv}/labels"))
    return s


SPECS = _specs()

PREPARE: Dict[str, Any] = {}  # the official download is used as it is
