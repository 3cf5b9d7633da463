"""Registering datasets in :data:`DatasetCatalog` / :data:`MetadataCatalog`.

Loading is lazy: registration only records where the files are; they are read when
``DatasetCatalog.get(name)`` is called (missing directories are reported then).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from ..catalog import DatasetCatalog, MetadataCatalog
from .coco import load_coco_instances_json, load_coco_panoptic_json, load_sem_seg

__all__ = ["register_coco_panoptic", "register_coco_instances", "register_sem_seg"]


def _set_metadata(name: str, paths: Dict[str, Any], defaults: Dict[str, Any],
                  metadata: Optional[dict]) -> None:
    meta = MetadataCatalog.get(name)
    # ``defaults`` do not override what is already known (e.g. built-in metadata of the name);
    # paths and what the caller passes are set (a conflict with an existing value raises).
    fields = {k: v for k, v in defaults.items() if k not in meta}
    fields.update({k: v for k, v in paths.items() if v is not None})
    fields.update(metadata or {})
    meta.set(**fields)


def register_coco_panoptic(
    name: str,
    metadata: Optional[dict],
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str] = None,
    instances_json: Optional[str] = None,
    prepare: Optional[Callable[[], object]] = None,
) -> None:
    """Register a COCO-format panoptic dataset (optionally with semantic PNGs).

    ``prepare``, if given, runs before the files are first read (e.g. to generate them).

    ``metadata`` holds the class tables (thing/stuff classes, colours and the
    ``*_dataset_id_to_contiguous_id`` maps); it is merged into ``MetadataCatalog.get(name)``
    together with ``image_root``, ``panoptic_root``, ``panoptic_json``, ``sem_seg_root``,
    ``json_file`` (= ``instances_json``), ``evaluator_type="coco_panoptic_seg"``,
    ``ignore_label=255`` and ``label_divisor=1000`` (values in ``metadata`` take precedence).
    """
    def load():
        if prepare is not None:
            prepare()
        return load_coco_panoptic_json(panoptic_json, image_root, panoptic_root, MetadataCatalog.get(name),
                                       sem_seg_root)

    DatasetCatalog.register(name, load)
    _set_metadata(
        name,
        dict(image_root=image_root, panoptic_root=panoptic_root, panoptic_json=panoptic_json,
             sem_seg_root=sem_seg_root, json_file=instances_json),
        dict(evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000),
        metadata,
    )


def register_coco_instances(name: str, metadata: Optional[dict], json_file: str,
                            image_root: str) -> None:
    """Register a COCO instances dataset (``evaluator_type="coco"``)."""
    DatasetCatalog.register(
        name,
        lambda: load_coco_instances_json(json_file, image_root, MetadataCatalog.get(name), name),
    )
    _set_metadata(name, dict(json_file=json_file, image_root=image_root),
                  dict(evaluator_type="coco"), metadata)


def register_sem_seg(name: str, metadata: Optional[dict], image_root: str, gt_root: str,
                     gt_ext: str = "png", image_ext: str = "jpg") -> None:
    """Register a semantic-segmentation dataset of an image dir and a label-PNG dir
    (``evaluator_type="sem_seg"``, ``ignore_label=255`` unless ``metadata`` says otherwise)."""
    DatasetCatalog.register(name, lambda: load_sem_seg(gt_root, image_root, gt_ext, image_ext))
    _set_metadata(
        name,
        dict(image_root=image_root, sem_seg_root=gt_root),
        dict(evaluator_type="sem_seg", ignore_label=255),
        metadata,
    )
