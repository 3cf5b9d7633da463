"""Dataset / metadata registries and the built-in metadata of the standard benchmarks.

This is a dependency-free stand-in for Detectron2's ``DatasetCatalog`` and
``MetadataCatalog``. The category tables of the built-in datasets live as JSON
files in ``mask2former/data/metadata/``; the metadata for a built-in name is
built from them the first time ``MetadataCatalog.get(name)`` is called.

Conventions (same as Mask2Former):

* ``stuff_classes`` always lists every class the model predicts, in contiguous
  id order; for panoptic datasets it therefore includes the thing classes.
* ``thing_dataset_id_to_contiguous_id`` / ``stuff_dataset_id_to_contiguous_id``
  map raw dataset category ids to contiguous training ids. For panoptic
  datasets the thing table contains only "thing" categories, and its values
  are the contiguous ids that panoptic inference treats as instances
  (see :func:`thing_contiguous_ids`).
"""

import copy
import json
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Set

__all__ = [
    "Metadata",
    "MetadataCatalog",
    "DatasetCatalog",
    "thing_contiguous_ids",
    "BUILTIN_METADATA_NAMES",
]

_METADATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata")


# --------------------------------------------------------------------------- #
# Metadata
# --------------------------------------------------------------------------- #
class Metadata:
    """A bag of attributes describing a dataset.

    Attributes can be read as ``meta.key`` or ``meta.get(key, default)``. Once
    set, an attribute may only be re-set to an equal value; a conflicting value
    raises ``ValueError`` (delete it first with ``del meta.key`` to replace it).
    """

    def __init__(self, name: str = "", **kwargs: Any):
        object.__setattr__(self, "_fields", OrderedDict())
        self._fields["name"] = name
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if key in fields:
            return fields[key]
        raise AttributeError(
            f"Metadata of dataset {fields.get('name', '')!r} has no attribute {key!r}. "
            f"Available: {sorted(fields)}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        fields = self._fields
        if key in fields and not _equal(fields[key], value):
            raise ValueError(
                f"Attribute {key!r} of metadata {fields['name']!r} is already set to a "
                f"different value ({fields[key]!r} vs {value!r})"
            )
        fields[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self._fields[key]
        except KeyError:
            raise AttributeError(key) from None

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def __repr__(self) -> str:
        keys = [k for k in self._fields if k != "name"]
        return f"Metadata(name={self._fields['name']!r}, keys={keys})"

    def __dir__(self):
        return list(super().__dir__()) + list(self._fields)

    def set(self, **kwargs: Any) -> "Metadata":
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def as_dict(self) -> Dict[str, Any]:
        return dict(self._fields)


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # e.g. numpy arrays with ambiguous truth value
        try:
            return bool((a == b).all())
        except Exception:
            return False


# --------------------------------------------------------------------------- #
# Catalogs
# --------------------------------------------------------------------------- #
class _DatasetCatalog:
    """Maps dataset names to zero-argument functions returning ``list[dict]``."""

    def __init__(self):
        self._funcs: "OrderedDict[str, Callable[[], List[dict]]]" = OrderedDict()

    def register(self, name: str, func: Callable[[], List[dict]]) -> None:
        if not callable(func):
            raise TypeError(f"Loader for dataset {name!r} must be callable, got {type(func)}")
        if name in self._funcs:
            raise KeyError(f"Dataset {name!r} is already registered")
        self._funcs[name] = func

    def get(self, name: str) -> List[dict]:
        try:
            func = self._funcs[name]
        except KeyError:
            raise KeyError(
                f"Dataset {name!r} is not registered. Available datasets: {list(self._funcs)}"
            ) from None
        return func()

    def list(self) -> List[str]:
        return list(self._funcs)

    def remove(self, name: str) -> None:
        self._funcs.pop(name)

    def clear(self) -> None:
        self._funcs.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._funcs

    def __repr__(self) -> str:
        return f"DatasetCatalog(registered={self.list()})"


class _MetadataCatalog:
    """Maps dataset names to :class:`Metadata`; unknown names get an empty one.

    Built-in names are populated lazily on first access.
    """

    def __init__(self):
        self._metas: "OrderedDict[str, Metadata]" = OrderedDict()

    def get(self, name: str) -> Metadata:
        meta = self._metas.get(name)
        if meta is None:
            meta = Metadata(name=name)
            builder = _BUILTIN.get(name)
            if builder is not None:
                meta.set(**builder())
            self._metas[name] = meta
        return meta

    def list(self) -> List[str]:
        """Names with metadata: those accessed so far plus all built-in names."""
        return list(self._metas) + [n for n in _BUILTIN if n not in self._metas]

    def remove(self, name: str) -> None:
        self._metas.pop(name, None)

    def clear(self) -> None:
        self._metas.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._metas or name in _BUILTIN

    def __repr__(self) -> str:
        return f"MetadataCatalog(names={self.list()})"


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()


def thing_contiguous_ids(metadata: Any) -> Optional[Set[int]]:
    """Contiguous ids treated as "things" in panoptic inference, or None if unknown."""
    if isinstance(metadata, dict):
        table = metadata.get("thing_dataset_id_to_contiguous_id")
    else:
        table = getattr(metadata, "get", lambda *_: None)("thing_dataset_id_to_contiguous_id")
    if table is None:
        return None
    return set(int(v) for v in table.values())


# --------------------------------------------------------------------------- #
# Built-in metadata
# --------------------------------------------------------------------------- #
@lru_cache(maxsize=None)
def _table(name: str) -> tuple:
    with open(os.path.join(_METADATA_DIR, name + ".json"), encoding="utf-8") as f:
        return tuple(json.load(f))


def _cats(name: str) -> List[dict]:
    return copy.deepcopy(list(_table(name)))


def _panoptic_meta(cats: List[dict], things_only_thing_classes: bool, stuff_map_all: bool) -> dict:
    """Panoptic metadata where contiguous ids enumerate ``cats`` (things and stuff together)."""
    things = [c for c in cats if c["isthing"]]
    thing_src = things if things_only_thing_classes else cats
    return {
        "thing_classes": [c["name"] for c in thing_src],
        "thing_colors": [c["color"] for c in thing_src],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(cats) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(cats) if stuff_map_all or not c["isthing"]
        },
    }


def _coco_instances() -> dict:
    things = [c for c in _cats("coco_panoptic") if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "evaluator_type": "coco",
    }


def _coco_panoptic(with_sem_seg: bool) -> dict:
    # Mask2Former: thing_classes/thing_colors hold only the 80 things, stuff_* all 133.
    # The plain split keeps a stuff-only stuff table; "_with_sem_seg" maps all 133
    # (so that the semantic-segmentation evaluator can be used too).
    meta = _panoptic_meta(_cats("coco_panoptic"), True, stuff_map_all=with_sem_seg)
    meta.update(evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000)
    return meta


def _coco_stuff_10k() -> dict:
    cats = _cats("coco_stuff_171")
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        "evaluator_type": "sem_seg",
        "ignore_label": 255,
    }


def _ade20k_sem_seg() -> dict:
    cats = _cats("ade20k_150")
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "evaluator_type": "sem_seg",
        "ignore_label": 255,
    }


def _ade20k_full() -> dict:
    cats = _cats("ade20k_847")
    return {
        "stuff_classes": [c["name"] for c in cats],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in cats},
        "evaluator_type": "sem_seg",
        "ignore_label": 65535,  # labels are stored as 16-bit images
    }


def _ade20k_panoptic() -> dict:
    meta = _panoptic_meta(_cats("ade20k_150"), True, stuff_map_all=True)
    meta.update(evaluator_type="ade20k_panoptic_seg", ignore_label=255, label_divisor=1000)
    return meta


def _ade20k_instance() -> dict:
    cats = _cats("ade20k_instance_100")
    color_of = {c["id"]: c["color"] for c in _cats("ade20k_150")}
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [color_of[c["id"]] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
        "evaluator_type": "coco",
    }


def _cityscapes(task: str) -> dict:
    cats = sorted(_cats("cityscapes"), key=lambda c: c["trainId"])
    things = [c for c in cats if c["isthing"]]
    meta = {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
    }
    if task == "sem_seg":
        meta.update(evaluator_type="cityscapes_sem_seg", ignore_label=255)
    else:
        meta.update(evaluator_type="cityscapes_instance")
    return meta


def _cityscapes_panoptic() -> dict:
    cats = sorted(_cats("cityscapes"), key=lambda c: c["trainId"])
    return {
        # contiguous ids are the Cityscapes train ids (0..18)
        "thing_classes": [c["name"] for c in cats],
        "thing_colors": [c["color"] for c in cats],
        "stuff_classes": [c["name"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: c["trainId"] for c in cats if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: c["trainId"] for c in cats if not c["isthing"]
        },
        "evaluator_type": "cityscapes_panoptic_seg",
        "ignore_label": 255,
        "label_divisor": 1000,
    }


def _mapillary_sem_seg() -> dict:
    cats = [c for c in _cats("mapillary_vistas_sem_seg") if c["evaluate"]]
    return {
        "stuff_classes": [c["readable"] for c in cats],
        "stuff_colors": [c["color"] for c in cats],
        "evaluator_type": "sem_seg",
        "ignore_label": 65,  # Mapillary Vistas uses 65 ("unlabeled") as ignore
    }


def _mapillary_panoptic() -> dict:
    # As in Mask2Former, thing_classes lists all 65 classes here.
    meta = _panoptic_meta(_cats("mapillary_vistas_panoptic"), False, stuff_map_all=True)
    meta.update(
        evaluator_type="mapillary_vistas_panoptic_seg", ignore_label=65, label_divisor=1000
    )
    return meta


def _builtin_table() -> Dict[str, Callable[[], dict]]:
    t: Dict[str, Callable[[], dict]] = OrderedDict()
    for name in [
        "coco_2014_train", "coco_2014_val", "coco_2014_minival", "coco_2014_valminusminival",
        "coco_2017_train", "coco_2017_val", "coco_2017_test", "coco_2017_test-dev",
        "coco_2017_val_100",
    ]:
        t[name] = _coco_instances
    for split in ("train", "val"):
        t[f"coco_2017_{split}_panoptic"] = lambda: _coco_panoptic(False)
        t[f"coco_2017_{split}_panoptic_with_sem_seg"] = lambda: _coco_panoptic(True)
        t[f"ade20k_sem_seg_{split}"] = _ade20k_sem_seg
        t[f"ade20k_full_sem_seg_{split}"] = _ade20k_full
        t[f"ade20k_panoptic_{split}"] = _ade20k_panoptic
        t[f"ade20k_instance_{split}"] = _ade20k_instance
        t[f"cityscapes_fine_panoptic_{split}"] = _cityscapes_panoptic
        t[f"mapillary_vistas_sem_seg_{split}"] = _mapillary_sem_seg
        t[f"mapillary_vistas_panoptic_{split}"] = _mapillary_panoptic
    for split in ("train", "test"):
        t[f"coco_2017_{split}_stuff_10k_sem_seg"] = _coco_stuff_10k
    for split in ("train", "val", "test"):
        t[f"cityscapes_fine_sem_seg_{split}"] = lambda: _cityscapes("sem_seg")
        t[f"cityscapes_fine_instance_seg_{split}"] = lambda: _cityscapes("instance_seg")
    return t


_BUILTIN = _builtin_table()
BUILTIN_METADATA_NAMES = tuple(_BUILTIN)
