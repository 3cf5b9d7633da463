"""Custom datasets from a YAML file, without writing code.

A file lists datasets to register under names usable in ``DATASETS.TRAIN`` / ``DATASETS.TEST``::

    datasets:
      - name: my_pan_train              # COCO panoptic: json + PNG folder (+ optional extras)
        type: coco_panoptic
        image_root: images/train
        panoptic_root: panoptic/train
        panoptic_json: annotations/panoptic_train.json
        sem_seg_root: semantic/train    # optional: semantic PNGs (contiguous ids), same names
        instances_json: annotations/instances_train.json   # optional: for instance AP
      - name: my_ins_val                # COCO instances json
        type: coco_instances
        image_root: images/val
        json_file: annotations/instances_val.json
      - name: my_sem_val                # a folder of images and a folder of label PNGs
        type: sem_seg
        image_root: images/val
        gt_root: labels/val
        classes: [road, car, sky]       # contiguous ids 0, 1, 2 in the label PNGs
        ignore_label: 255               # optional (default 255)
        image_ext: jpg                  # optional (default jpg)
        gt_ext: png                     # optional (default png)

Relative paths are relative to the folder of the YAML file (``~`` and ``$VARS`` are expanded).
For the COCO formats the class tables come from the json's ``categories``, in file order:
contiguous id ``i`` is the ``i``-th category; panoptic categories need ``isthing``. An entry may
instead give them as ``categories: [{id, name, isthing}, ...]`` (then the json is not read at
registration). Optional ``colors`` (sem_seg: one ``[r, g, b]`` per class) set the colours used
by the demo's visualisation; COCO categories may carry a ``color``.

Registration reads the category tables only; images and annotations are read when the dataset
is used. Files are registered with :func:`register_datasets_yaml`, from the environment variable
``M2F_DATASETS_YAML`` (one path, or several separated by ``os.pathsep``; done when
:mod:`mask2former.data` is imported), or by ``train_net.py --datasets FILE``. To check a file::

    python -m mask2former.data.datasets.custom my_datasets.yaml [--load]
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from ..catalog import BUILTIN_METADATA_NAMES, DatasetCatalog, MetadataCatalog
from ._common import instances_metadata, load_json, panoptic_metadata
from .register import register_coco_instances, register_coco_panoptic, register_sem_seg

__all__ = [
    "DatasetConfigError",
    "ENV_VAR",
    "load_datasets_yaml",
    "register_datasets_yaml",
    "register_from_env",
]

ENV_VAR = "M2F_DATASETS_YAML"

# type -> (required keys, optional keys); "name" and "type" are always required
_SCHEMA = {
    "coco_panoptic": (("image_root", "panoptic_root", "panoptic_json"),
                      ("sem_seg_root", "instances_json", "categories")),
    "coco_instances": (("image_root", "json_file"), ("categories",)),
    "sem_seg": (("image_root", "gt_root", "classes"),
                ("ignore_label", "image_ext", "gt_ext", "colors")),
}
_PATH_KEYS = ("image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "instances_json",
              "json_file", "gt_root")

# name -> (yaml file, entry) of what this module registered, so that registering the same file
# twice (e.g. from $M2F_DATASETS_YAML and from --datasets) is not a clash
_REGISTERED: Dict[str, tuple] = {}


class DatasetConfigError(ValueError):
    """A datasets YAML file is malformed or describes a dataset that cannot be registered."""


def _where(path: str, index: Optional[int], name: Any = None) -> str:
    if index is None:
        return path
    return f"{path}: datasets[{index}]" + (f" ({name!r})" if name else "")


def _read_yaml(path: str) -> Any:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"datasets YAML file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise DatasetConfigError(f"{path}: malformed YAML{pos}: {problem}") from None


def _resolve(base: str, value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetConfigError(f"{where}: '{key}' must be a non-empty path string; got {value!r}")
    p = os.path.expanduser(os.path.expandvars(value))
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))


def _check_categories(cats: Any, where: str, source: str, panoptic: bool) -> List[dict]:
    if not isinstance(cats, list) or not cats:
        raise DatasetConfigError(f"{where}: {source} must be a non-empty list of categories")
    out, seen = [], set()
    for i, c in enumerate(cats):
        need = ("id", "name", "isthing") if panoptic else ("id", "name")
        if not isinstance(c, dict) or any(k not in c for k in need):
            raise DatasetConfigError(
                f"{where}: category #{i} of {source} must be a mapping with {', '.join(need)}; "
                f"got {c!r}")
        try:
            cid = int(c["id"])
        except (TypeError, ValueError):
            raise DatasetConfigError(f"{where}: category #{i} of {source} has a non-integer id "
                                     f"{c['id']!r}") from None
        if cid in seen:
            raise DatasetConfigError(f"{where}: category id {cid} appears twice in {source}")
        seen.add(cid)
        out.append({"id": cid, "name": str(c["name"]), "isthing": int(bool(c.get("isthing", 1))),
                    "color": c.get("color")})
    return out


def _colors(n: int) -> List[List[int]]:
    """``n`` distinct, deterministic colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
        out.append([int(r * 255), int(g * 255), int(b * 255)])
    return out


def _with_colors(cats: List[dict]) -> List[dict]:
    """``cats`` with a ``color`` each: its own, else a default one."""
    default = _colors(len(cats))
    return [dict(c, color=list(c["color"]) if c.get("color") else default[i])
            for i, c in enumerate(cats)]


def _json_categories(json_path: str, where: str, panoptic: bool) -> List[dict]:
    data = load_json(json_path, "annotation file")
    if not isinstance(data, dict) or "categories" not in data:
        raise DatasetConfigError(f"{where}: {json_path} has no top-level 'categories' list")
    return _check_categories(data["categories"], where, f"the categories of {json_path}", panoptic)


def _validate(entry: Any, index: int, path: str, base: str) -> dict:
    if not isinstance(entry, dict):
        raise DatasetConfigError(f"{_where(path, index)}: each dataset must be a mapping; got {entry!r}")
    name = entry.get("name")
    where = _where(path, index, name)
    if not isinstance(name, str) or not name.strip():
        raise DatasetConfigError(f"{where}: missing 'name' (a non-empty string)")
    kind = entry.get("type")
    if kind not in _SCHEMA:
        raise DatasetConfigError(
            f"{where}: unknown type {kind!r}; expected one of {sorted(_SCHEMA)}")
    required, optional = _SCHEMA[kind]
    missing = [k for k in required if k not in entry]
    if missing:
        raise DatasetConfigError(f"{where}: type {kind!r} needs {', '.join(missing)}")
    unknown = sorted(set(entry) - set(required) - set(optional) - {"name", "type"})
    if unknown:
        raise DatasetConfigError(
            f"{where}: unknown keys {unknown} for type {kind!r} (allowed: "
            f"{sorted(set(required) | set(optional))})")
    out = dict(entry)
    for key in _PATH_KEYS:
        if key in out and out[key] is not None:
            out[key] = _resolve(base, out[key], where, key)
    if kind == "sem_seg":
        classes = out["classes"]
        if not isinstance(classes, list) or not classes or not all(
                isinstance(c, (str, int)) for c in classes):
            raise DatasetConfigError(f"{where}: 'classes' must be a non-empty list of class names")
        out["classes"] = [str(c) for c in classes]
        ignore = out.get("ignore_label", 255)
        if isinstance(ignore, bool) or not isinstance(ignore, int) or ignore < 0:
            raise DatasetConfigError(f"{where}: 'ignore_label' must be a non-negative integer")
        if ignore < len(classes):
            raise DatasetConfigError(
                f"{where}: ignore_label {ignore} is also the id of class {classes[ignore]!r}")
        out["ignore_label"] = ignore
        colors = out.get("colors")
        if colors is not None and (not isinstance(colors, list) or len(colors) != len(classes)):
            raise DatasetConfigError(f"{where}: 'colors' must list one [r, g, b] per class")
        for key, default in (("image_ext", "jpg"), ("gt_ext", "png")):
            out[key] = str(out.get(key, default)).lstrip(".")
    if "categories" in out:
        out["categories"] = _check_categories(out["categories"], where, "'categories'",
                                              kind == "coco_panoptic")
    return out


def load_datasets_yaml(path: str) -> List[dict]:
    """Parse and validate a datasets YAML file; returns its entries with absolute paths."""
    path = os.path.abspath(os.path.expanduser(path))
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
        raise DatasetConfigError(f"{path}: expected a mapping with a 'datasets' list")
    extra = sorted(set(data) - {"datasets"})
    if extra:
        raise DatasetConfigError(f"{path}: unknown top-level keys {extra} (only 'datasets')")
    base = os.path.dirname(path)
    entries = [_validate(e, i, path, base) for i, e in enumerate(data["datasets"])]
    seen: Dict[str, int] = {}
    for i, e in enumerate(entries):
        if e["name"] in seen:
            raise DatasetConfigError(
                f"{_where(path, i, e['name'])}: the name is also used by datasets[{seen[e['name']]}]")
        seen[e["name"]] = i
    return entries


def _metadata_of(entry: dict, where: str) -> dict:
    kind = entry["type"]
    if kind == "sem_seg":
        classes = entry["classes"]
        return {"stuff_classes": list(classes),
                "stuff_colors": [list(c) for c in entry["colors"]] if entry.get("colors")
                else _colors(len(classes)),
                "ignore_label": entry["ignore_label"]}
    panoptic = kind == "coco_panoptic"
    cats = entry.get("categories")
    if cats is None:
        json_path = entry["panoptic_json"] if panoptic else entry["json_file"]
        cats = _json_categories(json_path, where, panoptic)
    # Mask2Former's convention for panoptic: thing_* lists the things, stuff_* every class, and
    # the stuff table maps every class (so that the semantic evaluator can map predictions back)
    return (panoptic_metadata if panoptic else instances_metadata)(_with_colors(cats))


def register_datasets_yaml(path: str) -> List[str]:
    """Register every dataset of a YAML file (all or none: the file is validated and every
    category table read before anything is registered). Returns the names."""
    abspath = os.path.abspath(os.path.expanduser(path))
    entries = load_datasets_yaml(abspath)
    plans = []
    for i, e in enumerate(entries):
        name = e["name"]
        where = _where(abspath, i, name)
        previous = _REGISTERED.get(name)
        if previous is not None and previous == (abspath, e):
            continue  # this very entry was registered before
        if name in DatasetCatalog or name in BUILTIN_METADATA_NAMES:
            raise DatasetConfigError(
                f"{where}: a dataset named {name!r} is already registered"
                + (f" (by {previous[0]})" if previous else " (a built-in name)")
                + "; choose another name")
        try:
            meta = _metadata_of(e, where)
        except DatasetConfigError:
            raise
        except (OSError, ValueError) as err:  # unreadable or malformed json
            raise DatasetConfigError(f"{where}: {err}") from None
        plans.append((e, meta))

    names = []
    for e, meta in plans:
        name, kind = e["name"], e["type"]
        if kind == "coco_panoptic":
            register_coco_panoptic(name, meta, e["image_root"], e["panoptic_root"], e["panoptic_json"],
                                   sem_seg_root=e.get("sem_seg_root"),
                                   instances_json=e.get("instances_json"))
        elif kind == "coco_instances":
            register_coco_instances(name, meta, e["json_file"], e["image_root"])
        else:
            register_sem_seg(name, meta, e["image_root"], e["gt_root"], gt_ext=e["gt_ext"],
                             image_ext=e["image_ext"])
        MetadataCatalog.get(name).set(datasets_yaml=abspath)
        _REGISTERED[name] = (abspath, e)
        names.append(name)
    return names


def register_from_env(var: str = ENV_VAR) -> List[str]:
    """Register the YAML files named by the environment variable ``var`` (paths separated by
    ``os.pathsep``); nothing when it is unset or empty."""
    value = os.environ.get(var, "")
    names = []
    for path in (p for p in value.split(os.pathsep) if p.strip()):
        try:
            names += register_datasets_yaml(path)
        except FileNotFoundError as e:
            raise DatasetConfigError(f"${var}: {e}") from None
    return names


def unregister(names: Sequence[str]) -> None:
    """Remove datasets registered by this module (mainly for tests)."""
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        _REGISTERED.pop(name, None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mask2former.data.datasets.custom",
        description="Check a datasets YAML file: register its datasets and print their classes "
                    "(with --load, also read every dataset and print its number of images).")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--load", action="store_true", help="read each dataset's annotations")
    args = parser.parse_args(argv)
    try:
        for path in args.files:
            for name in register_datasets_yaml(path):
                meta = MetadataCatalog.get(name)
                classes = meta.get("stuff_classes") or meta.get("thing_classes") or []
                line = f"{name}: {meta.evaluator_type}, {len(classes)} classes"
                if args.load:
                    try:
                        line += f", {len(DatasetCatalog.get(name))} images"
                    except (OSError, ValueError) as e:  # say which file and entry failed to load
                        raise DatasetConfigError(f"{os.path.abspath(path)}: dataset {name!r}: {e}") from None
                print(line)
    except (DatasetConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
