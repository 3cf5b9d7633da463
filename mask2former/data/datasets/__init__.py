"""Datasets: one module per family, the shared formats and the registration helpers.

* families with built-in names (listed in :data:`mask2former.data.catalog.BUILTIN_FAMILIES`),
  each holding its metadata builders, names, paths and layouts, loaders and preparation steps:
  :mod:`.coco`, :mod:`.ade20k`, :mod:`.cityscapes`,
  :mod:`.mapillary_vistas`;
* :mod:`.synthetic` (a generated panoptic set) and :mod:`.custom` (datasets described in YAML);
* shared: :mod:`.formats` (COCO panoptic / instances and image + label folder loaders),
  :mod:`.register` (registration, built-in dataset specs), :mod:`.builtin` (registers every
  family's datasets under ``$DETECTRON2_DATASETS``), :mod:`._common` (errors, JSON, metadata
  builders, preparation helpers).
"""
from ._common import DatasetFormatError
from .formats import load_coco_instances_json, load_coco_panoptic_json, load_sem_seg
from .register import register_coco_instances, register_coco_panoptic, register_sem_seg

__all__ = [
    "DatasetFormatError",
    "load_coco_panoptic_json",
    "load_coco_instances_json",
    "load_sem_seg",
    "register_coco_panoptic",
    "register_coco_instances",
    "register_sem_seg",
]
