"""Registering datasets in :data:`DatasetCatalog` / :data:`MetadataCatalog`.

Loading is lazy: registration only records where the files are; they are read when
``DatasetCatalog.get(name)`` is called (missing directories are reported then).

* :func:`register_coco_panoptic`, :func:`register_coco_instances`, :func:`register_sem_seg`:
  one dataset in one of the formats of :mod:`.formats`, at absolute paths.
* :class:`DatasetSpec` and :func:`coco_panoptic_spec` / :func:`coco_instances_spec` /
  :func:`sem_seg_spec`: how a family module describes a built-in dataset (paths relative to the
  datasets root); :func:`register_spec` registers one under a root, checking its files on use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..catalog import DatasetCatalog, MetadataCatalog, builtin_metadata
from ._common import missing_files_error
from .formats import load_coco_instances_json, load_coco_panoptic_json, load_sem_seg

__all__ = ["register_coco_panoptic", "register_coco_instances", "register_sem_seg",
           "DatasetSpec", "coco_panoptic_spec", "coco_instances_spec", "sem_seg_spec",
           "register_spec"]

# A loader takes the dataset's paths (metadata key -> absolute path) and its registered name.
Loader = Callable[[Dict[str, str], str], List[dict]]


def _set_metadata(name: str, paths: Dict[str, Any], defaults: Dict[str, Any],
                  metadata: Optional[dict]) -> None:
    meta = MetadataCatalog.get(name)
    # ``defaults`` do not override what is already known (e.g. built-in metadata of the name);
    # paths and what the caller passes are set (a conflict with an existing value raises).
    fields = {k: v for k, v in defaults.items() if k not in meta}
    fields.update({k: v for k, v in paths.items() if v is not None})
    fields.update(metadata or {})
    meta.set(**fields)


def _load_coco_panoptic(p: Dict[str, str], name: str) -> List[dict]:
    return load_coco_panoptic_json(p["panoptic_json"], p["image_root"], p["panoptic_root"],
                                   MetadataCatalog.get(name), p.get("sem_seg_root"))


def _load_coco_instances(p: Dict[str, str], name: str) -> List[dict]:
    return load_coco_instances_json(p["json_file"], p["image_root"], MetadataCatalog.get(name),
                                    name)


def _load_sem_seg(p: Dict[str, str], name: str, gt_ext: str, image_ext: str) -> List[dict]:
    return load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext, image_ext)


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
    paths = dict(image_root=image_root, panoptic_root=panoptic_root, panoptic_json=panoptic_json,
                 sem_seg_root=sem_seg_root, json_file=instances_json)

    def load():
        if prepare is not None:
            prepare()
        return _load_coco_panoptic(paths, name)

    DatasetCatalog.register(name, load)
    _set_metadata(name, paths,
                  dict(evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000),
                  metadata)


def register_coco_instances(name: str, metadata: Optional[dict], json_file: str,
                            image_root: str) -> None:
    """Register a COCO instances dataset (``evaluator_type="coco"``)."""
    paths = dict(json_file=json_file, image_root=image_root)
    DatasetCatalog.register(name, lambda: _load_coco_instances(paths, name))
    _set_metadata(name, paths, dict(evaluator_type="coco"), metadata)


def register_sem_seg(name: str, metadata: Optional[dict], image_root: str, gt_root: str,
                     gt_ext: str = "png", image_ext: str = "jpg") -> None:
    """Register a semantic-segmentation dataset of an image dir and a label-PNG dir
    (``evaluator_type="sem_seg"``, ``ignore_label=255`` unless ``metadata`` says otherwise)."""
    paths = dict(image_root=image_root, sem_seg_root=gt_root)
    DatasetCatalog.register(name, lambda: _load_sem_seg(paths, name, gt_ext, image_ext))
    _set_metadata(name, paths, dict(evaluator_type="sem_seg", ignore_label=255), metadata)


# ----------------------------------------------------------------------------- built-in specs
# what each path is, in the error for missing files
_ROLES = {
    "image_root": "image folder (image_root)",
    "image_dir": "image folder",
    "panoptic_root": "panoptic PNG folder (panoptic_root)",
    "panoptic_json": "panoptic annotation file (panoptic_json)",
    "sem_seg_root": "semantic label folder (sem_seg_root)",
    "json_file": "instance annotation file (json_file)",
    "gt_dir": "ground-truth folder (gtFine/<split>)",
}


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset as its family defines it.

    Attributes:
        name: the official name (its metadata is ``builtin_metadata()[name]()``).
        layout: the family's expected layout, shown when files are missing.
        paths: metadata key (``image_root``, ``panoptic_json``, ...) -> path relative to the
            datasets root; all are recorded in the metadata.
        required: the keys of ``paths`` that must exist before loading, in the order reported.
        load: ``load(absolute paths, registered name) -> list[dict]``.
    """

    name: str
    layout: str
    paths: Dict[str, str]
    required: Tuple[str, ...]
    load: Loader


def coco_panoptic_spec(name: str, layout: str, **paths: str) -> DatasetSpec:
    """COCO-format panoptic: ``image_root``, ``panoptic_root``, ``panoptic_json`` and optional
    ``sem_seg_root`` (required when given) and ``json_file`` (only read for instance AP, so not
    required)."""
    required = tuple(k for k in ("image_root", "panoptic_root", "panoptic_json", "sem_seg_root")
                     if k in paths)
    return DatasetSpec(name, layout, paths, required, _load_coco_panoptic)


def coco_instances_spec(name: str, layout: str, image_root: str, json_file: str) -> DatasetSpec:
    return DatasetSpec(name, layout, dict(image_root=image_root, json_file=json_file),
                       ("image_root", "json_file"), _load_coco_instances)


def sem_seg_spec(name: str, layout: str, image_root: str, sem_seg_root: str,
                 image_ext: str = "jpg", gt_ext: str = "png") -> DatasetSpec:
    return DatasetSpec(name, layout, dict(image_root=image_root, sem_seg_root=sem_seg_root),
                       ("image_root", "sem_seg_root"),
                       partial(_load_sem_seg, gt_ext=gt_ext, image_ext=image_ext))


def register_spec(spec: DatasetSpec, name: str, root: str) -> None:
    """Register ``spec`` under ``name`` with its paths under ``root``; its metadata is the
    official name's class tables plus the paths. Nothing is read until the dataset is used;
    then missing files raise :class:`~._common.DatasetNotFoundError`."""
    p = {k: os.path.join(root, v) for k, v in spec.paths.items()}
    required = [(_ROLES[k], p[k]) for k in spec.required]

    def loader() -> List[dict]:
        missing = [(role, path) for role, path in required if not os.path.exists(path)]
        if missing:
            raise missing_files_error(name, root, spec.layout, missing)
        return spec.load(p, name)

    loader.__name__ = f"load_{name}"
    DatasetCatalog.register(name, loader)
    # the class tables carry evaluator_type / ignore_label ..., so no defaults are needed
    _set_metadata(name, p, {}, builtin_metadata()[spec.name]())
