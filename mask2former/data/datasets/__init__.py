"""Loaders for the standard dataset layouts and their registration helpers."""
from ._common import DatasetFormatError
from .coco import load_coco_instances_json, load_coco_panoptic_json, load_sem_seg
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
