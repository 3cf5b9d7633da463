"""Dataset / metadata registries, and where the built-in metadata comes from.

This is a dependency-free stand-in for Detectron2's ``DatasetCatalog`` and
``MetadataCatalog``. The built-in datasets come in families, one module each under
:mod:`mask2former.data.datasets` (listed in :data:`BUILTIN_FAMILIES`); a family module holds
``METADATA`` (official name -> builder of that name's metadata dict), ``SPECS`` (the datasets
registered under ``$DETECTRON2_DATASETS``) and ``PREPARE`` (its ``python -m
mask2former.data.prepare`` subcommands). The category tables they build from are JSON files in
``mask2former/data/metadata/`` (:func:`builtin_categories`); the metadata for a built-in name is
built the first time ``MetadataCatalog.get(name)`` is called.

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
import importlib
import json
import os
from collections import OrderedDict
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

__all__ = [
    "Metadata",
    "MetadataCatalog",
    "DatasetCatalog",
    "thing_contiguous_ids",
    "BUILTIN_METADATA_NAMES",
    "BUILTIN_FAMILIES",
    "builtin_families",
    "family_table",
    "builtin_metadata",
    "builtin_categories",
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
            builder = builtin_metadata().get(name)
            if builder is not None:
                meta.set(**builder())
            self._metas[name] = meta
        return meta

    def list(self) -> List[str]:
        """Names with metadata: those accessed so far plus all built-in names."""
        return list(self._metas) + [n for n in builtin_metadata() if n not in self._metas]

    def remove(self, name: str) -> None:
        self._metas.pop(name, None)

    def clear(self) -> None:
        self._metas.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._metas or name in builtin_metadata()

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
# Built-in families
# --------------------------------------------------------------------------- #
#: The modules of :mod:`mask2former.data.datasets` that define built-in datasets; a new family
#: is one module with METADATA / SPECS / PREPARE and one entry here. (The synthetic set and the
#: YAML-described datasets register themselves; their names are not built-in.)
BUILTIN_FAMILIES = ("coco", "ade20k", "cityscapes", "mapillary_vistas")


@lru_cache(maxsize=None)
def builtin_families() -> Tuple[ModuleType, ...]:
    """The family modules of :data:`BUILTIN_FAMILIES`, imported on first use (they import this
    module, so it cannot import them at load time)."""
    return tuple(importlib.import_module(f"{__package__}.datasets.{f}") for f in BUILTIN_FAMILIES)


def family_table(attr: str) -> "OrderedDict[str, Any]":
    """The mappings ``attr`` (``"METADATA"``, ``"PREPARE"``) of every family merged, in family
    order; a key defined by two families is an error."""
    table: "OrderedDict[str, Any]" = OrderedDict()
    for family in builtin_families():
        for key, value in getattr(family, attr).items():
            if key in table:
                raise RuntimeError(f"{attr} entry {key!r} of {family.__name__} is also defined by "
                                   "another family")
            table[key] = value
    return table


@lru_cache(maxsize=None)
def builtin_metadata() -> "OrderedDict[str, Callable[[], dict]]":
    """Every built-in name -> the builder of its metadata dict (class tables, evaluator_type,
    ignore_label ...)."""
    return family_table("METADATA")


@lru_cache(maxsize=None)
def _table(name: str) -> tuple:
    with open(os.path.join(_METADATA_DIR, name + ".json"), encoding="utf-8") as f:
        return tuple(json.load(f))


def builtin_categories(name: str) -> List[dict]:
    """A fresh copy of the category list ``mask2former/data/metadata/<name>.json`` (dicts with
    ``id``, ``name`` and, per table, ``isthing``, ``color``, ``trainId`` ...)."""
    return copy.deepcopy(list(_table(name)))




def __getattr__(name: str) -> Any:
    # BUILTIN_METADATA_NAMES needs the family modules, which import this one: computed on access
    if name == "BUILTIN_METADATA_NAMES":
        return tuple(builtin_metadata())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
