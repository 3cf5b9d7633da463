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

Each family module (:data:`mask2former.data.catalog.BUILTIN_FAMILIES`: :mod:`.coco`,
:mod:`.ade20k`, :mod:`.cityscapes`, :mod:`.mapillary_vistas`) lists its datasets in ``SPECS``:
official name, paths relative to the root, the files to check, the loader and the layout to show.
The metadata of each name (``MetadataCatalog.get(name)``) combines the family's class tables
(with ``evaluator_type`` / ``ignore_label``) with the paths (``image_root``, ``panoptic_root``,
``panoptic_json``, ``sem_seg_root``, ``json_file`` as they apply).

``register_all_builtin(root, prefix="x_")`` registers the same datasets again under another
root with prefixed names (``x_coco_2017_val_panoptic`` ...), each with the class tables of its
official name; tests use this to point the loaders at generated data.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

from ..catalog import DatasetCatalog, builtin_families
from ._common import README, DatasetNotFoundError, datasets_root  # noqa: F401 (former home)
from .cityscapes import (  # noqa: F401 (former home)
    load_cityscapes_instances,
    load_cityscapes_panoptic,
    load_cityscapes_semantic,
)
from .register import DatasetSpec, register_spec

__all__ = [
    "DatasetNotFoundError",
    "datasets_root",
    "builtin_specs",
    "builtin_dataset_names",
    "register_all_builtin",
    "load_cityscapes_semantic",
    "load_cityscapes_instances",
    "load_cityscapes_panoptic",
]


def builtin_specs() -> List[DatasetSpec]:
    """The datasets of every built-in family, in family order."""
    return [spec for family in builtin_families() for spec in family.SPECS]


def builtin_dataset_names() -> List[str]:
    """The official names that :func:`register_all_builtin` registers."""
    return [spec.name for spec in builtin_specs()]


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
    for spec in builtin_specs():
        if wanted is not None and spec.name not in wanted:
            continue
        name = prefix + spec.name
        if name in DatasetCatalog:
            continue
        register_spec(spec, name, root)
        done.append(name)
    return done
