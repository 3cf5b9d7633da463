import importlib
import pkgutil
import re

import pytest

import mask2former.data.datasets as datasets_pkg
from mask2former.data import DatasetCatalog, Metadata, MetadataCatalog, prepare
from mask2former.data.catalog import (
    BUILTIN_FAMILIES,
    BUILTIN_METADATA_NAMES,
    builtin_families,
    builtin_metadata,
    thing_contiguous_ids,
)
from mask2former.data.datasets.builtin import builtin_dataset_names, builtin_specs

M = MetadataCatalog.get


# ----------------------------------------------------------------- registries
def test_metadata_basics():
    m = Metadata(name="x", a=1)
    assert m.a == 1 and m.get("a") == 1 and m.get("b", 7) == 7
    m.a = 1  # same value is fine
    with pytest.raises(ValueError):
        m.a = 2
    with pytest.raises(AttributeError):
        m.missing
    m.set(b=[1, 2])
    assert m.as_dict() == {"name": "x", "a": 1, "b": [1, 2]}
    del m.a
    m.a = 3
    assert m.a == 3


def test_metadata_catalog_unknown_and_persistent():
    meta = M("some_unknown_dataset_xyz")
    assert meta.as_dict() == {"name": "some_unknown_dataset_xyz"}
    meta.foo = 3
    assert M("some_unknown_dataset_xyz").foo == 3
    with pytest.raises(ValueError):
        M("some_unknown_dataset_xyz").foo = 4
    MetadataCatalog.remove("some_unknown_dataset_xyz")
    assert M("some_unknown_dataset_xyz").get("foo") is None
    MetadataCatalog.remove("some_unknown_dataset_xyz")


def test_builtin_metadata_cannot_be_changed():
    meta = M("ade20k_sem_seg_val")
    meta.ignore_label = 255
    with pytest.raises(ValueError):
        meta.ignore_label = 0


def test_dataset_catalog():
    DatasetCatalog.register("_tmp_ds", lambda: [{"file_name": "a.jpg"}])
    try:
        assert "_tmp_ds" in DatasetCatalog.list()
        assert DatasetCatalog.get("_tmp_ds") == [{"file_name": "a.jpg"}]
        with pytest.raises(KeyError):
            DatasetCatalog.register("_tmp_ds", lambda: [])
        with pytest.raises(TypeError):
            DatasetCatalog.register("_tmp_ds2", [])
    finally:
        DatasetCatalog.remove("_tmp_ds")
    assert "_tmp_ds" not in DatasetCatalog.list()
    with pytest.raises(KeyError):
        DatasetCatalog.get("_tmp_ds")


# ------------------------------------------------------------ built-in tables
def _is_rgb(c):
    return len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)


@pytest.mark.parametrize("name", BUILTIN_METADATA_NAMES)
def test_builtin_consistency(name):
    meta = M(name)
    d = meta.as_dict()
    assert "evaluator_type" in d
    for kind in ("thing", "stuff"):
        if f"{kind}_colors" in d:
            assert len(d[f"{kind}_colors"]) == len(d[f"{kind}_classes"])
            assert all(_is_rgb(c) for c in d[f"{kind}_colors"])
        table = d.get(f"{kind}_dataset_id_to_contiguous_id")
        if table is not None:
            assert all(isinstance(k, int) and isinstance(v, int) for k, v in table.items())
    # contiguous ids of all known categories are exactly 0..N-1
    ids = list(d.get("stuff_dataset_id_to_contiguous_id", {}).values())
    ids += [v for v in d.get("thing_dataset_id_to_contiguous_id", {}).values() if v not in ids]
    if "stuff_classes" in d and "stuff_dataset_id_to_contiguous_id" in d:
        assert sorted(ids) == list(range(len(d["stuff_classes"])))
    elif "thing_dataset_id_to_contiguous_id" in d:
        assert sorted(ids) == list(range(len(d["thing_classes"])))


def test_coco():
    inst = M("coco_2017_train")
    assert len(inst.thing_classes) == 80 and inst.evaluator_type == "coco"
    assert inst.thing_dataset_id_to_contiguous_id[1] == 0 and inst.thing_classes[0] == "person"
    assert inst.thing_dataset_id_to_contiguous_id[90] == 79  # toothbrush
    assert "coco_2017_test-dev" in MetadataCatalog.list()

    for name in ("coco_2017_train_panoptic", "coco_2017_val_panoptic_with_sem_seg"):
        p = M(name)
        assert len(p.stuff_classes) == 133 and len(p.stuff_colors) == 133
        assert len(p.thing_classes) == 80  # Mask2Former keeps only things here
        assert len(p.thing_dataset_id_to_contiguous_id) == 80
        assert p.thing_dataset_id_to_contiguous_id[1] == 0
        assert p.stuff_classes[-1] == "rug-merged"
        assert p.stuff_classes[p.stuff_dataset_id_to_contiguous_id[199]] == "wall-other-merged"
        assert p.ignore_label == 255 and p.label_divisor == 1000
        assert p.evaluator_type == "coco_panoptic_seg"
        assert thing_contiguous_ids(p) == set(range(80))
    assert len(M("coco_2017_val_panoptic_with_sem_seg").stuff_dataset_id_to_contiguous_id) == 133
    assert len(M("coco_2017_val_panoptic").stuff_dataset_id_to_contiguous_id) == 53

    stuff = M("coco_2017_train_stuff_10k_sem_seg")
    assert len(stuff.stuff_classes) == 171 and stuff.ignore_label == 255
    assert stuff.stuff_dataset_id_to_contiguous_id[182] == 170
    assert thing_contiguous_ids(stuff) is None


def test_ade20k():
    sem = M("ade20k_sem_seg_val")
    assert len(sem.stuff_classes) == 150 and len(sem.stuff_colors) == 150
    assert sem.stuff_classes[0] == "wall" and sem.ignore_label == 255
    assert sem.evaluator_type == "sem_seg"
    full = M("ade20k_full_sem_seg_train")
    assert len(full.stuff_classes) == 847 and full.ignore_label == 65535
    pan = M("ade20k_panoptic_train")
    assert len(pan.stuff_classes) == 150 and len(pan.thing_classes) == 100
    assert len(pan.stuff_dataset_id_to_contiguous_id) == 150
    things = thing_contiguous_ids(pan)
    assert len(things) == 100 and 0 not in things and 12 in things  # wall / person
    assert pan.evaluator_type == "ade20k_panoptic_seg"
    inst = M("ade20k_instance_val")
    assert len(inst.thing_classes) == 100 and inst.evaluator_type == "coco"
    # instance ids are the panoptic ids of the thing classes
    assert set(inst.thing_dataset_id_to_contiguous_id) == set(
        pan.thing_dataset_id_to_contiguous_id
    )


def test_cityscapes():
    for task in ("sem_seg", "instance_seg"):
        m = M(f"cityscapes_fine_{task}_train")
        assert len(m.stuff_classes) == 19 and len(m.thing_classes) == 8
        assert m.stuff_classes[11:] == m.thing_classes
    assert M("cityscapes_fine_sem_seg_val").ignore_label == 255
    assert M("cityscapes_fine_instance_seg_val").evaluator_type == "cityscapes_instance"
    pan = M("cityscapes_fine_panoptic_val")
    assert pan.thing_dataset_id_to_contiguous_id[24] == 11  # person: id 24 -> trainId 11
    assert pan.stuff_dataset_id_to_contiguous_id[7] == 0  # road
    assert thing_contiguous_ids(pan) == set(range(11, 19))
    assert pan.evaluator_type == "cityscapes_panoptic_seg"


def test_mapillary():
    sem = M("mapillary_vistas_sem_seg_train")
    assert len(sem.stuff_classes) == 65 and sem.ignore_label == 65
    assert sem.stuff_classes[0] == "Bird"
    pan = M("mapillary_vistas_panoptic_val")
    assert len(pan.stuff_classes) == 65 and pan.ignore_label == 65
    assert len(thing_contiguous_ids(pan)) == 37
    assert pan.stuff_classes == sem.stuff_classes
    assert pan.evaluator_type == "mapillary_vistas_panoptic_seg"


def test_thing_contiguous_ids_dict_and_missing():
    assert thing_contiguous_ids({"thing_dataset_id_to_contiguous_id": {5: 2}}) == {2}
    assert thing_contiguous_ids(Metadata(name="y")) is None


# ------------------------------------------------------------------ families
def test_every_family_listed_and_complete():
    """Each module of mask2former.data.datasets that defines built-in names is a listed family,
    and each family defines its metadata, datasets and preparation tasks."""
    defining = set()
    for info in pkgutil.iter_modules(datasets_pkg.__path__):
        module = importlib.import_module(f"{datasets_pkg.__name__}.{info.name}")
        if hasattr(module, "METADATA") or hasattr(module, "SPECS"):
            defining.add(info.name)
    assert defining == set(BUILTIN_FAMILIES)
    for family in builtin_families():
        assert isinstance(family.METADATA, dict) and family.METADATA, family.__name__
        assert isinstance(family.SPECS, list) and isinstance(family.PREPARE, dict)
        assert {s.name for s in family.SPECS} <= set(family.METADATA), family.__name__
        assert family.__doc__ and "METADATA" in family.__doc__, family.__name__


def test_every_name_defined_and_registered_once():
    per_family = [n for f in builtin_families() for n in f.METADATA]
    assert len(per_family) == len(set(per_family)) == len(BUILTIN_METADATA_NAMES)
    assert set(per_family) == set(BUILTIN_METADATA_NAMES) == set(builtin_metadata())
    names = builtin_dataset_names()
    assert len(names) == len(set(names)) and set(names) <= set(BUILTIN_METADATA_NAMES)
    assert all(n in DatasetCatalog for n in names)
    # names with metadata only (COCO 2014, test-dev, ...) have no files layout to register
    assert set(BUILTIN_METADATA_NAMES) - set(names) == {
        "coco_2014_train", "coco_2014_val", "coco_2014_minival", "coco_2014_valminusminival",
        "coco_2017_test", "coco_2017_test-dev", "coco_2017_val_100"}


def test_specs_paths_and_layouts():
    """Paths are relative to the datasets root, what must exist is among them, and the layout
    shown for missing files names the dataset's folder and only prepare subcommands that exist."""
    tasks = set(prepare.tasks())
    for spec in builtin_specs():
        assert spec.required and set(spec.required) <= set(spec.paths), spec.name
        assert all(not p.startswith("/") for p in spec.paths.values()), spec.name
        top = {p.split("/")[0] for p in spec.paths.values()}
        assert len(top) == 1 and spec.layout.startswith(top.pop() + "/"), spec.name
        for task in re.findall(r"prepare (\w+)", spec.layout):
            assert task in tasks, (spec.name, task)


# name prefix -> (stuff classes, thing classes, entries of the thing table) (None: no such key)
_COUNTS = {
    "coco_2014_": (None, 80, 80), "coco_2017_train": (None, 80, 80),
    "coco_2017_val": (None, 80, 80), "coco_2017_test": (None, 80, 80),
    "coco_2017_train_panoptic": (133, 80, 80), "coco_2017_val_panoptic": (133, 80, 80),
    "coco_2017_train_stuff_10k": (171, None, None), "coco_2017_test_stuff_10k": (171, None, None),
    "ade20k_sem_seg_": (150, None, None), "ade20k_full_sem_seg_": (847, None, None),
    "ade20k_panoptic_": (150, 100, 100), "ade20k_instance_": (None, 100, 100),
    "cityscapes_fine_sem_seg_": (19, 8, None), "cityscapes_fine_instance_seg_": (19, 8, None),
    "cityscapes_fine_panoptic_": (19, 19, 8),
    "mapillary_vistas_sem_seg_": (65, None, None), "mapillary_vistas_panoptic_": (65, 65, 37),
}


@pytest.mark.parametrize("name", BUILTIN_METADATA_NAMES)
def test_builtin_class_counts_and_tables(name):
    d = M(name).as_dict()
    prefix = max((p for p in _COUNTS if name.startswith(p)), key=len)
    n_stuff, n_thing, n_table = _COUNTS[prefix]
    assert len(d.get("stuff_classes", ())) == (n_stuff or 0)
    assert len(d.get("thing_classes", ())) == (n_thing or 0)
    things = d.get("thing_dataset_id_to_contiguous_id")
    assert (None if things is None else len(things)) == n_table
    stuff = d.get("stuff_dataset_id_to_contiguous_id") or {}
    if things and "stuff_classes" in d:
        # panoptic: the things' contiguous ids index stuff_classes, which lists every class;
        # thing_classes are those classes in contiguous order (or every class)
        assert all(stuff.get(k, v) == v for k, v in things.items())
        named = [d["stuff_classes"][v] for v in sorted(things.values())]
        assert d["thing_classes"] in (named, d["stuff_classes"])
    elif things:
        assert sorted(things.values()) == list(range(len(d["thing_classes"])))
    elif "thing_classes" in d:  # Cityscapes semantic / instance: the things close the list
        assert d["stuff_classes"][-len(d["thing_classes"]):] == d["thing_classes"]
    if stuff:
        assert set(stuff.values()) <= set(range(len(d["stuff_classes"])))
