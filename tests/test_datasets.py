"""Built-in dataset registration (official names and layouts), custom datasets from YAML, the
preparation tools, and an end-to-end ``train_net.py --eval-only`` on a generated COCO layout.

Bad input covered elsewhere (not repeated here): malformed annotation json naming the file,
line and column, a missing directory listing the layout, and panoptic category ids missing
from the metadata are in tests/test_data.py (test_malformed_json_names_file_and_position,
test_missing_directory_lists_layout, test_unknown_category_is_reported); predictions for
images the GT does not have are in tests/test_evaluation.py
(test_coco_panoptic_evaluator_errors, test_instance_evaluator_errors).
"""
import builtins
import importlib.util
import io
import json
import logging
import math
import os
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from mask2former.data import DatasetCatalog, MetadataCatalog, prepare
from mask2former.data.datasets import DatasetFormatError
from mask2former.data.datasets.builtin import (
    DatasetNotFoundError,
    builtin_dataset_names,
    datasets_root,
    register_all_builtin,
)
from mask2former.data.datasets.custom import (
    DatasetConfigError,
    load_datasets_yaml,
    register_datasets_yaml,
    register_from_env,
    unregister,
)
from tests.conftest import require_shared

REPO = Path(__file__).resolve().parents[1]
COCO_CATS = json.loads((REPO / "mask2former" / "data" / "metadata" / "coco_panoptic.json").read_text())
CONTIG = {c["id"]: i for i, c in enumerate(COCO_CATS)}  # dataset id -> contiguous id (all 133)
THINGS = {c["id"] for c in COCO_CATS if c["isthing"]}
PERSON, CAR, TREE, SKY, GRASS = 1, 3, 184, 187, 193


@pytest.fixture
def restore_logging():
    """``setup()`` configures the "mask2former" logger (own handlers, no propagation); undo it."""
    log = logging.getLogger("mask2former")
    state = (list(log.handlers), log.propagate, log.level)
    yield
    for h in list(log.handlers):
        if h not in state[0]:
            log.removeHandler(h)
            h.close()
    log.propagate = state[1]
    log.setLevel(state[2])


@pytest.fixture
def registered():
    """``reg(root, names=None)`` registers built-in datasets under ``root`` with a fresh prefix and
    returns ``prefix``; everything registered is removed afterwards."""
    made = []

    def reg(root, names=None):
        prefix = f"t{uuid.uuid4().hex[:8]}_"
        made.extend(register_all_builtin(str(root), prefix=prefix, names=names))
        return prefix

    yield reg
    unregister(made)


# --------------------------------------------------------------------------- generated data
def _id_to_rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _render(k, h=120, w=160):
    """Image k: (segment-id map, segments [(id, category, iscrowd)], RGB image)."""
    rng = np.random.default_rng(100 + k)
    yy, xx = np.mgrid[0:h, 0:w]
    seg = np.zeros((h, w), np.int64)  # 0 = VOID (the bottom rows stay unlabeled)
    horizon = 45 + 8 * k
    seg[:horizon] = 11                                      # sky
    seg[horizon:h - 3] = 12                                 # grass
    segments = [(11, SKY, 0), (12, GRASS, 0)]
    if k == 2:
        seg[5:40, 10:50] = 13                               # a tree in the sky
        segments.append((13, TREE, 0))
    seg[30:90, 20 + 10 * k:60 + 10 * k] = 21                 # a person, medium (< 96^2 pixels)
    segments.append((21, PERSON, 0))
    car = ((xx - 125) / 11.0) ** 2 + ((yy - (100 - 5 * k)) / 7.0) ** 2 <= 1
    seg[car] = 22                                           # a car, small (< 32^2 pixels)
    segments.append((22, CAR, 0))
    if k == 1:
        seg[8:28, 100:150] = 23                             # a crowd of people
        segments.append((23, PERSON, 1))
    palette = {SKY: (110, 160, 230), GRASS: (60, 140, 50), TREE: (30, 90, 30), PERSON: (200, 60, 70),
               CAR: (40, 40, 200)}
    image = np.zeros((h, w, 3))
    for sid, cat, _ in segments:
        image[seg == sid] = palette[cat]
    image += rng.normal(0, 12, (h, w, 3))
    return seg, segments, np.clip(image, 0, 255).astype(np.uint8)


IMAGE_IDS = [139, 285, 632]


def make_coco(root, split="val2017", with_semseg=True, override=None):
    """A 3-image COCO 2017 layout under ``root/coco`` with categories from the real COCO tables.

    ``override`` maps image ids to their GT ``(segment-id map, [(id, category, iscrowd)],
    [(category, mask, iscrowd)] instances)`` in place of the drawn shapes.
    """
    coco = Path(root) / "coco"
    dirs = {k: coco / d for k, d in (("img", split), ("pan", f"panoptic_{split}"),
                                      ("sem", f"panoptic_semseg_{split}"), ("ann", "annotations"))}
    for key, d in dirs.items():
        if key != "sem" or with_semseg:
            d.mkdir(parents=True, exist_ok=True)
    images, pan_anns, ins_anns, semantic = [], [], [], {}
    for k, image_id in enumerate(IMAGE_IDS):
        seg, segments, image = _render(k)
        instances = [(cat, seg == sid, crowd) for sid, cat, crowd in segments if cat in THINGS]
        if override and image_id in override:
            seg, segments, instances = override[image_id]
        h, w = seg.shape
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(dirs["img"] / f"{stem}.jpg", quality=95)
        Image.fromarray(_id_to_rgb(seg)).save(dirs["pan"] / f"{stem}.png")
        sem = np.full((h, w), 255, np.uint8)
        infos = []
        for sid, cat, crowd in segments:
            m = seg == sid
            sem[m] = CONTIG[cat]
            infos.append({"id": sid, "category_id": cat, "iscrowd": crowd, "area": int(m.sum()),
                          "bbox": _bbox(m)})
        for cat, m, crowd in instances:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            ins_anns.append({"id": len(ins_anns) + 1, "image_id": image_id, "category_id": cat,
                             "iscrowd": crowd, "area": int(m.sum()), "bbox": _bbox(m),
                             "segmentation": rle})
        semantic[image_id] = sem
        if with_semseg:
            Image.fromarray(sem).save(dirs["sem"] / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos})
    cats = [dict(c, supercategory="x") for c in COCO_CATS]
    pan_json = dirs["ann"] / f"panoptic_{split}.json"
    ins_json = dirs["ann"] / f"instances_{split}.json"
    pan_json.write_text(json.dumps({"images": images, "annotations": pan_anns, "categories": cats}))
    ins_json.write_text(json.dumps({"images": images, "annotations": ins_anns,
                                    "categories": [c for c in cats if c["isthing"]]}))
    return {"root": str(root), "image_root": str(dirs["img"]), "panoptic_root": str(dirs["pan"]),
            "sem_seg_root": str(dirs["sem"]), "panoptic_json": str(pan_json),
            "json_file": str(ins_json), "semantic": semantic}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("dsroot"))


# --------------------------------------------------------------------------- built-in registration
def test_builtin_names_registered_at_import():
    names = builtin_dataset_names()
    for required in ["coco_2017_train_panoptic", "coco_2017_val_panoptic_with_sem_seg", "coco_2017_val",
                     "coco_2017_test_stuff_10k_sem_seg", "ade20k_sem_seg_val", "ade20k_panoptic_val",
                     "ade20k_instance_val", "ade20k_full_sem_seg_val", "cityscapes_fine_sem_seg_val",
                     "cityscapes_fine_instance_seg_val", "cityscapes_fine_panoptic_val",
                     "mapillary_vistas_sem_seg_val", "mapillary_vistas_panoptic_val"]:
        assert required in names
    root = os.path.abspath(datasets_root())
    for name in names:
        assert name in DatasetCatalog
        meta = MetadataCatalog.get(name)
        assert meta.get("evaluator_type"), name
        image_root = meta.get("image_root")
        assert image_root and os.path.abspath(image_root).startswith(root), name
    m = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert Path(m.image_root).parts[-2:] == ("coco", "val2017")
    assert Path(m.sem_seg_root).parts[-2:] == ("coco", "panoptic_semseg_val2017")
    assert Path(m.panoptic_json).parts[-3:] == ("coco", "annotations", "panoptic_val2017.json")
    assert Path(m.json_file).name == "instances_val2017.json"
    assert len(m.stuff_classes) == 133 and m.evaluator_type == "coco_panoptic_seg"
    ade = MetadataCatalog.get("ade20k_sem_seg_val")
    assert Path(ade.sem_seg_root).parts[-3:] == ("ADEChallengeData2016", "annotations_detectron2",
                                                 "validation")
    assert ade.ignore_label == 255 and len(ade.stuff_classes) == 150
    assert MetadataCatalog.get("mapillary_vistas_sem_seg_val").ignore_label == 65
    assert MetadataCatalog.get("ade20k_full_sem_seg_val").ignore_label == 65535
    assert MetadataCatalog.get("ade20k_panoptic_val").evaluator_type == "ade20k_panoptic_seg"
    cs = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    assert Path(cs.panoptic_json).name == "cityscapes_panoptic_val.json"
    assert Path(cs.gt_dir).parts[-2:] == ("gtFine", "val")


def test_registering_reads_nothing(tmp_path, monkeypatch, registered):
    root = tmp_path / "not_there"
    touched = []

    def spy(fn):
        def wrapper(*a, **k):
            path = a[0] if a else k.get("path", k.get("file"))
            if isinstance(path, (str, os.PathLike)) and str(root) in str(os.fspath(path)):
                touched.append((fn.__name__, path))
            return fn(*a, **k)
        return wrapper

    for name in ("stat", "lstat", "listdir", "scandir"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    prefix = registered(root)
    monkeypatch.undo()
    assert touched == []
    assert not root.exists()
    assert len([n for n in DatasetCatalog.list() if n.startswith(prefix)]) == len(builtin_dataset_names())


def test_missing_directory_error_lists_layout(tmp_path, registered):
    prefix = registered(tmp_path)
    name = prefix + "coco_2017_val_panoptic_with_sem_seg"
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get(name)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for part in (name, str(tmp_path / "coco" / "val2017"), str(tmp_path / "coco" / "panoptic_val2017"),
                 "panoptic_val2017.json", "panoptic_semseg_val2017", "Expected layout",
                 "datasets/README.md", "DETECTRON2_DATASETS", "instances_val2017.json"):
        assert part in msg, part
    # only what is missing is listed as missing
    coco = make_coco(tmp_path, with_semseg=False)
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get(name)
    first = str(e.value).split("Expected layout")[0]
    assert "panoptic_semseg_val2017" in first and coco["image_root"] not in first
    assert len(DatasetCatalog.get(prefix + "coco_2017_val_panoptic")) == 3
    for other in ("ade20k_sem_seg_val", "cityscapes_fine_panoptic_val", "mapillary_vistas_panoptic_val",
                  "ade20k_full_sem_seg_train", "coco_2017_test_stuff_10k_sem_seg"):
        with pytest.raises(DatasetNotFoundError, match="datasets/README.md"):
            DatasetCatalog.get(prefix + other)


def test_builtin_coco_layout_loads(coco, registered):
    prefix = registered(coco["root"])
    name = prefix + "coco_2017_val_panoptic_with_sem_seg"
    meta = MetadataCatalog.get(name)
    for key in ("image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"):
        assert os.path.samefile(meta.get(key), coco[key]), key
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.ignore_label == 255
    assert meta.label_divisor == 1000
    official = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    for key in ("thing_classes", "stuff_classes", "thing_dataset_id_to_contiguous_id",
                "stuff_dataset_id_to_contiguous_id"):
        assert meta.get(key) == official.get(key)
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == IMAGE_IDS
    d = dicts[1]
    assert os.path.isfile(d["file_name"]) and os.path.isfile(d["sem_seg_file_name"])
    assert (d["height"], d["width"]) == (120, 160)
    cats = [(s["category_id"], s["isthing"], s["iscrowd"]) for s in d["segments_info"]]
    assert cats == [(CONTIG[SKY], False, 0), (CONTIG[GRASS], False, 0), (0, True, 0), (2, True, 0),
                    (0, True, 1)]
    inst = DatasetCatalog.get(prefix + "coco_2017_val")
    assert MetadataCatalog.get(prefix + "coco_2017_val").evaluator_type == "coco"
    assert [a["category_id"] for a in inst[1]["annotations"]] == [0, 2, 0]  # person, car, crowd


def test_unknown_instance_category_is_reported(tmp_path, registered):
    coco = make_coco(tmp_path)
    data = json.loads(Path(coco["json_file"]).read_text())
    data["annotations"][0]["category_id"] = 999
    Path(coco["json_file"]).write_text(json.dumps(data))
    prefix = registered(tmp_path)
    with pytest.raises(DatasetFormatError, match="category_id 999"):
        DatasetCatalog.get(prefix + "coco_2017_val")


# --------------------------------------------------------------------------- preparation tools
def test_prepare_coco_panoptic_semseg(tmp_path):
    coco = make_coco(tmp_path, with_semseg=False)
    assert prepare.main(["coco_panoptic_semseg", "--root", str(tmp_path), "--workers", "1"]) == 1  # no train
    prepare.convert_coco_panoptic_semseg(str(tmp_path), workers=1, splits=("val2017",))
    for image_id, expected in coco["semantic"].items():
        got = np.asarray(Image.open(Path(coco["sem_seg_root"]) / f"{image_id:012d}.png"))
        np.testing.assert_array_equal(got, expected)


def test_prepare_ade20k_and_builtin_ade20k(tmp_path, registered):
    ade = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    labels = {}
    for split, tag in (("training", "train"), ("validation", "val")):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in (1, 2):
            stem = f"ADE_{tag}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(ade / "images" / split / f"{stem}.jpg")
            lab = rng.integers(0, 151, (24, 32)).astype(np.uint8)
            lab[0, :3] = [0, 1, 150]
            Image.fromarray(lab).save(ade / "annotations" / split / f"{stem}.png")
            labels[(split, stem)] = lab
    assert prepare.main(["ade20k_sem_seg", "--root", str(tmp_path), "--workers", "2"]) == 0
    for (split, stem), lab in labels.items():
        got = np.asarray(Image.open(ade / "annotations_detectron2" / split / f"{stem}.png"))
        expected = np.where(lab == 0, 255, lab.astype(np.int64) - 1)
        np.testing.assert_array_equal(got, expected)
        assert got[0, :3].tolist() == [255, 0, 149]
    prefix = registered(tmp_path)
    dicts = DatasetCatalog.get(prefix + "ade20k_sem_seg_val")
    assert [Path(d["file_name"]).stem for d in dicts] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert all(Path(d["sem_seg_file_name"]).parent == ade / "annotations_detectron2" / "validation"
               for d in dicts)
    meta = MetadataCatalog.get(prefix + "ade20k_sem_seg_val")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    assert len(meta.stuff_classes) == 150


# --------------------------------------------------------------------------- Cityscapes
def _make_cityscapes(root, split="val"):
    cs = Path(root) / "cityscapes"
    img_dir, gt_dir = cs / "leftImg8bit" / split / "frankfurt", cs / "gtFine" / split / "frankfurt"
    pan_dir = cs / "gtFine" / f"cityscapes_panoptic_{split}"
    for d in (img_dir, gt_dir, pan_dir):
        d.mkdir(parents=True)
    h, w = 32, 64
    anns = []
    for f in (19, 294):
        base = f"frankfurt_000000_{f:06d}"
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(img_dir / f"{base}_leftImg8bit.png")
        inst = np.full((h, w), 7, np.int32)              # road (stuff: bare label id)
        inst[:8] = 5                                     # "dynamic": ignored in evaluation
        inst[10:20, 4:14] = 26001                        # car #1
        inst[10:20, 20:30] = 26002                       # car #2
        inst[22:30, 40:50] = 24                          # a group of persons: crowd
        inst[22:30, 52:60] = 25000                       # rider #0
        Image.fromarray(inst.astype(np.uint16)).save(gt_dir / f"{base}_gtFine_instanceIds.png")
        train = np.full((h, w), 255, np.uint8)
        train[inst == 7] = 0
        Image.fromarray(train).save(gt_dir / f"{base}_gtFine_labelTrainIds.png")
        pan = np.where(inst == 5, 0, inst)
        Image.fromarray(_id_to_rgb(pan)).save(pan_dir / f"{base}_gtFine_panoptic.png")
        anns.append({"image_id": base, "file_name": f"{base}_gtFine_panoptic.png", "segments_info": [
            {"id": 7, "category_id": 7, "iscrowd": 0}, {"id": 26001, "category_id": 26, "iscrowd": 0},
            {"id": 26002, "category_id": 26, "iscrowd": 0}, {"id": 24, "category_id": 24, "iscrowd": 1},
            {"id": 25000, "category_id": 25, "iscrowd": 0}]})
    (cs / "gtFine" / f"cityscapes_panoptic_{split}.json").write_text(json.dumps({"annotations": anns}))
    return cs


def test_cityscapes_loaders(tmp_path, registered):
    cs = _make_cityscapes(tmp_path)
    prefix = registered(tmp_path)
    sem = DatasetCatalog.get(prefix + "cityscapes_fine_sem_seg_val")
    assert [d["image_id"] for d in sem] == ["frankfurt_000000_000019", "frankfurt_000000_000294"]
    assert all(os.path.isfile(d["sem_seg_file_name"]) for d in sem)
    assert MetadataCatalog.get(prefix + "cityscapes_fine_sem_seg_val").ignore_label == 255

    inst = DatasetCatalog.get(prefix + "cityscapes_fine_instance_seg_val")
    annos = inst[0]["annotations"]
    # category ids: person 0, rider 1, car 2 (train-id order of the 8 thing classes)
    assert sorted((a["category_id"], a["iscrowd"]) for a in annos) == [(0, 1), (1, 0), (2, 0), (2, 0)]
    car1 = next(a for a in annos if a["category_id"] == 2 and a["bbox"][0] == 4)
    mask = mask_util.decode(car1["segmentation"]).astype(bool)
    assert mask.sum() == 100 and mask[10:20, 4:14].all()
    assert car1["bbox"] == [4.0, 10.0, 14.0, 20.0] and car1["bbox_mode"] == 0
    assert (inst[0]["height"], inst[0]["width"]) == (32, 64)

    pan = DatasetCatalog.get(prefix + "cityscapes_fine_panoptic_val")
    segs = {s["id"]: (s["category_id"], s["isthing"]) for s in pan[1]["segments_info"]}
    assert segs == {7: (0, False), 26001: (13, True), 26002: (13, True), 24: (11, True), 25000: (12, True)}
    assert pan[1]["sem_seg_file_name"] == sem[1]["sem_seg_file_name"]
    assert os.path.isfile(pan[1]["pan_seg_file_name"])

    # train ids not generated yet: the error says how to make them
    for p in (cs / "gtFine" / "val" / "frankfurt").glob("*labelTrainIds.png"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="createTrainIdLabelImgs"):
        DatasetCatalog.get(prefix + "cityscapes_fine_sem_seg_val")


# --------------------------------------------------------------------------- custom YAML datasets
def _write_yaml(path, text):
    Path(path).write_text(text)
    return str(path)


@pytest.fixture
def sem_folder(tmp_path):
    img, gt = tmp_path / "sem" / "img", tmp_path / "sem" / "gt"
    img.mkdir(parents=True)
    gt.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img / f"{i}.png")
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(gt / f"{i}.png")
    return tmp_path / "sem"


def test_custom_yaml_all_types(coco, sem_folder, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    yaml_path = _write_yaml(tmp_path / "ds.yaml", f"""
datasets:
  - name: pan_{tag}
    type: coco_panoptic
    image_root: {rel(coco['image_root'])}
    panoptic_root: {rel(coco['panoptic_root'])}
    panoptic_json: {rel(coco['panoptic_json'])}
    sem_seg_root: {rel(coco['sem_seg_root'])}
    instances_json: {rel(coco['json_file'])}
  - name: ins_{tag}
    type: coco_instances
    image_root: {rel(coco['image_root'])}
    json_file: {rel(coco['json_file'])}
  - name: sem_{tag}
    type: sem_seg
    image_root: sem/img
    gt_root: sem/gt
    classes: [background, thing]
    ignore_label: 255
    image_ext: png
""")
    names = register_datasets_yaml(yaml_path)
    try:
        assert names == [f"pan_{tag}", f"ins_{tag}", f"sem_{tag}"]
        # the class tables read from the json (categories in file order) are COCO's
        pan = MetadataCatalog.get(f"pan_{tag}")
        official = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
        for key in ("thing_classes", "stuff_classes", "thing_dataset_id_to_contiguous_id",
                    "stuff_dataset_id_to_contiguous_id"):
            assert pan.get(key) == official.get(key), key
        assert pan.evaluator_type == "coco_panoptic_seg"
        assert os.path.samefile(pan.json_file, coco["json_file"])
        d = DatasetCatalog.get(f"pan_{tag}")
        assert len(d) == 3 and os.path.isfile(d[0]["sem_seg_file_name"])
        ins = MetadataCatalog.get(f"ins_{tag}")
        assert ins.evaluator_type == "coco" and len(ins.thing_classes) == 80
        assert ins.thing_dataset_id_to_contiguous_id[CAR] == 2
        assert [a["category_id"] for a in DatasetCatalog.get(f"ins_{tag}")[0]["annotations"]] == [0, 2]
        sem = MetadataCatalog.get(f"sem_{tag}")
        assert sem.stuff_classes == ["background", "thing"] and sem.ignore_label == 255
        assert sem.evaluator_type == "sem_seg" and len(sem.stuff_colors) == 2
        assert len(DatasetCatalog.get(f"sem_{tag}")) == 2
        # registering the same file again (e.g. from the env var and --datasets) is a no-op
        assert register_datasets_yaml(yaml_path) == []
        monkeypatch.setenv("M2F_DATASETS_YAML", os.pathsep.join([yaml_path, yaml_path]))
        assert register_from_env() == []
    finally:
        unregister(names)
    monkeypatch.setenv("M2F_DATASETS_YAML", os.pathsep.join([yaml_path, str(tmp_path / "nope.yaml")]))
    try:
        with pytest.raises(DatasetConfigError, match="M2F_DATASETS_YAML.*nope.yaml"):
            register_from_env()
    finally:
        unregister(names)


def test_datasets_flag(sem_folder, tmp_path, restore_logging):
    from mask2former.engine.defaults import default_argument_parser, setup

    name = f"flag_{uuid.uuid4().hex[:8]}"
    yaml_path = _write_yaml(tmp_path / "d.yaml", f"""
datasets:
  - {{name: {name}, type: sem_seg, image_root: sem/img, gt_root: sem/gt, classes: [a, b], image_ext: png}}
""")
    args = default_argument_parser().parse_args(
        ["--datasets", yaml_path, "OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.TEST", f"('{name}',)"])
    assert args.datasets == [yaml_path]
    try:
        cfg = setup(args)
        assert list(cfg.DATASETS.TEST) == [name]
        assert MetadataCatalog.get(name).stuff_classes == ["a", "b"]
        assert len(DatasetCatalog.get(name)) == 2
    finally:
        unregister([name])


def test_datasets_flag_repeats_and_env_var_lists_several_files(sem_folder, tmp_path, restore_logging,
                                                               monkeypatch):
    """README: ``train_net.py --datasets FILE`` is repeatable, and M2F_DATASETS_YAML lists several
    files separated by os.pathsep; every file's datasets are registered."""
    from mask2former.engine.defaults import default_argument_parser, setup

    tag = uuid.uuid4().hex[:8]
    names = [f"{k}_{tag}" for k in ("flag1", "flag2", "env1", "env2")]
    paths = [_write_yaml(tmp_path / f"{n}.yaml", f"""
datasets:
  - {{name: {n}, type: sem_seg, image_root: sem/img, gt_root: sem/gt, classes: [{n}, x], image_ext: png}}
""") for n in names]
    try:
        args = default_argument_parser().parse_args(
            ["--datasets", paths[0], "--config-file", "", "--datasets", paths[1], "OUTPUT_DIR", str(tmp_path / "out"),
             "DATASETS.TEST", f"('{names[0]}', '{names[1]}')"])
        assert args.datasets == paths[:2]
        assert list(setup(args).DATASETS.TEST) == names[:2]
        monkeypatch.setenv("M2F_DATASETS_YAML", os.pathsep.join(paths[2:]))
        assert register_from_env() == names[2:]
        for n in names:
            assert MetadataCatalog.get(n).stuff_classes == [n, "x"], n
            assert len(DatasetCatalog.get(n)) == 2, n
    finally:
        unregister(names)


def test_example_yaml_is_valid():
    entries = load_datasets_yaml(str(REPO / "datasets" / "example_datasets.yaml"))
    assert {e["type"] for e in entries} == {"coco_panoptic", "coco_instances", "sem_seg"}
    assert all(os.path.isabs(e["image_root"]) for e in entries)


@pytest.mark.parametrize("body, pattern", [
    ("- {name: a1, type: foo, image_root: x}", r"datasets\[0\] \('a1'\): unknown type 'foo'"),
    ("- {name: a2, type: coco_panoptic, image_root: x, panoptic_root: y}",
     r"datasets\[0\] \('a2'\): type 'coco_panoptic' needs panoptic_json"),
    ("- {name: a3, type: coco_instances, image_rot: x, image_root: x, json_file: y}",
     r"unknown keys \['image_rot'\]"),
    ("- {type: sem_seg}", r"datasets\[0\]: missing 'name'"),
    ("- {name: coco_2017_val, type: coco_instances, image_root: x, json_file: y,\n"
     "    categories: [{id: 1, name: p}]}", r"'coco_2017_val' is already registered"),
    ("- {name: a4, type: sem_seg, image_root: x, gt_root: y, classes: [a]}\n"
     "- {name: a4, type: sem_seg, image_root: x, gt_root: y, classes: [a]}",
     r"datasets\[1\] \('a4'\): the name is also used by datasets\[0\]"),
    ("- {name: a5, type: sem_seg, image_root: x, gt_root: y, classes: []}", r"'classes' must be"),
    ("- {name: a6, type: sem_seg, image_root: x, gt_root: y, classes: [a, b], ignore_label: 1}",
     r"ignore_label 1 is also the id of class 'b'"),
    ("- {name: a7, type: coco_panoptic, image_root: x, panoptic_root: y, panoptic_json: z,\n"
     "    categories: [{id: 1, name: p}]}", r"category #0 .* must be a mapping with id, name, isthing"),
    ("- {name: a8, type: coco_instances, image_root: x, json_file: missing.json}",
     r"datasets\[0\] \('a8'\): annotation file not found: .*missing.json"),
    ("- [name, a9]", r"datasets\[0\]: each dataset must be a mapping"),
    ("- {name: a10, type: sem_seg\n  image_root: x", r"malformed YAML at line \d+, column \d+"),
])
def test_custom_yaml_errors(tmp_path, body, pattern):
    path = _write_yaml(tmp_path / "bad.yaml", "datasets:\n" + "\n".join("  " + line for line in body.splitlines()))
    with pytest.raises(DatasetConfigError, match=pattern) as e:
        register_datasets_yaml(path)
    assert str(tmp_path / "bad.yaml") in str(e.value)


def test_custom_yaml_bad_json_and_atomicity(tmp_path, sem_folder):
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "bad.json").write_text('{"images": [],\n "categories": [{"id": 1,}]}')
    path = _write_yaml(tmp_path / "d.yaml", f"""
datasets:
  - {{name: ok_{tag}, type: sem_seg, image_root: sem/img, gt_root: sem/gt, classes: [a]}}
  - {{name: bad_{tag}, type: coco_instances, image_root: sem/img, json_file: bad.json}}
""")
    with pytest.raises(DatasetConfigError) as e:
        register_datasets_yaml(path)
    msg = str(e.value)
    assert f"datasets[1] ('bad_{tag}')" in msg and "bad.json" in msg and "line 2, column" in msg
    assert f"ok_{tag}" not in DatasetCatalog  # all or nothing
    with pytest.raises(DatasetConfigError, match="expected a mapping with a 'datasets' list"):
        register_datasets_yaml(_write_yaml(tmp_path / "e.yaml", "- a\n"))


def test_custom_categories_and_unknown_annotation_category(coco, tmp_path):
    name = f"cat_{uuid.uuid4().hex[:8]}"
    path = _write_yaml(tmp_path / "c.yaml", f"""
datasets:
  - name: {name}
    type: coco_panoptic
    image_root: {coco['image_root']}
    panoptic_root: {coco['panoptic_root']}
    panoptic_json: {coco['panoptic_json']}
    categories:
      - {{id: {SKY}, name: sky, isthing: 0}}
      - {{id: {PERSON}, name: person, isthing: 1}}
""")
    register_datasets_yaml(path)
    try:
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == ["sky", "person"] and meta.thing_classes == ["person"]
        assert meta.thing_dataset_id_to_contiguous_id == {PERSON: 1}
        with pytest.raises(DatasetFormatError, match=f"category_id {GRASS}"):
            DatasetCatalog.get(name)  # the json has grass, which this table lacks
    finally:
        unregister([name])


# --------------------------------------------------------------------------- end to end
def _metric(v):
    return float("nan") if isinstance(v, str) and v.lower() == "nan" else float(v)


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net_under_test", REPO / "train_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_model(cfg):
    from mask2former.checkpoint import load_checkpoint
    from mask2former.engine import Trainer

    model = Trainer.build_model(cfg)
    load_checkpoint(model, cfg.MODEL.WEIGHTS)
    return model.eval()


def _prediction_as_gt(cfg, coco, image_id):
    """The tiny model's panoptic prediction (and its 3 best instances) on one image, as GT in
    ``make_coco``'s override format (dataset category ids)."""
    from mask2former.data import build_mapper

    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    thing_c2d = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    stuff_c2d = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    image = os.path.join(coco["image_root"], f"{image_id:012d}.jpg")
    with torch.inference_mode():
        out = _tiny_model(cfg)([build_mapper(cfg, False)({"file_name": image, "image_id": image_id})])[0]
    seg, infos = out["panoptic_seg"]
    seg = np.maximum(seg.cpu().numpy().astype(np.int64), 0)
    segments = [(s["id"], (thing_c2d if s["isthing"] else stuff_c2d)[s["category_id"]], 0) for s in infos]
    inst = out["instances"]
    order = inst.scores.argsort(descending=True).tolist()
    masks = (inst.pred_masks > 0.5).cpu().numpy()
    instances = [(thing_c2d[int(inst.pred_classes[i])], masks[i], 0) for i in order if masks[i].any()][:3]
    assert segments and instances
    return seg, segments, instances


def _direct_metrics(cfg, name, coco):
    """Run the model on the dataset ourselves and compute PQ, mIoU and mask AP directly."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from mask2former.data import build_mapper
    from mask2former.evaluation.panoptic_evaluation import (
        PQStat,
        pq_compute_single,
        pq_results,
        pq_results_to_metrics,
    )

    model = _tiny_model(cfg)
    mapper = build_mapper(cfg, False)
    meta = MetadataCatalog.get(name)
    thing_c2d = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    stuff_c2d = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    gt_json = json.loads(Path(coco["panoptic_json"]).read_text())
    gt_anns = {a["image_id"]: a for a in gt_json["annotations"]}
    categories = {c["id"]: c for c in gt_json["categories"]}

    k = len(meta.stuff_classes)
    conf = np.zeros((k, k), np.int64)  # [pred, gt], ignored GT pixels left out
    pq = PQStat()
    coco_results = []
    for d in DatasetCatalog.get(name):
        with torch.inference_mode():
            out = model([mapper(d)])[0]
        image_id = d["image_id"]
        # panoptic: contiguous -> dataset ids, then the per-image PQ statistics
        seg, infos = out["panoptic_seg"]
        seg = seg.cpu().numpy().astype(np.int64)
        seg = np.where(seg < 0, 0, seg)  # VOID
        segments = [{"id": s["id"], "category_id": (thing_c2d if s["isthing"] else stuff_c2d)[s["category_id"]]}
                    for s in infos]
        with Image.open(Path(coco["panoptic_root"]) / gt_anns[image_id]["file_name"]) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        gt_seg = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        pq += pq_compute_single(gt_seg, gt_anns[image_id]["segments_info"], seg, segments, categories)
        # semantic: confusion matrix by hand
        pred = out["sem_seg"].argmax(0).cpu().numpy()
        gt = coco["semantic"][image_id].astype(np.int64)
        valid = gt != 255
        np.add.at(conf, (pred[valid], gt[valid]), 1)
        # instances: COCO results with dataset category ids
        inst = out["instances"]
        masks = (inst.pred_masks > 0.5).cpu().numpy()
        for m, score, cls in zip(masks, inst.scores.tolist(), inst.pred_classes.tolist()):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            coco_results.append({"image_id": image_id, "category_id": thing_c2d[cls], "score": score,
                                 "segmentation": rle})

    panoptic = pq_results_to_metrics(pq_results(pq, categories))

    tp = np.diag(conf).astype(float)
    gt_count, pred_count = conf.sum(0).astype(float), conf.sum(1).astype(float)
    present = gt_count > 0
    iou = tp[present] / (gt_count + pred_count - tp)[present]
    sem = {"mIoU": 100 * iou.mean(), "fwIoU": 100 * (iou * gt_count[present]).sum() / gt_count.sum(),
           "mACC": 100 * (tp[present] / gt_count[present]).mean(), "pACC": 100 * tp.sum() / gt_count.sum()}
    sem_per_class = {f"IoU-{n}": present[i] for i, n in enumerate(meta.stuff_classes)}

    with contextlib_quiet():
        coco_gt = COCO(coco["json_file"])
        ev = COCOeval(coco_gt, coco_gt.loadRes(coco_results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    segm = {key: (100 * v if v >= 0 else float("nan"))
            for key, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6])}
    return panoptic, sem, sem_per_class, segm


def contextlib_quiet():
    import contextlib

    return contextlib.redirect_stdout(io.StringIO())


@pytest.mark.slow
def test_eval_only_end_to_end_on_coco_layout(registered, tmp_path, restore_logging, parity_dir):
    """Acceptance: ``train_net.py --eval-only`` with the tiny parity checkpoint on a generated
    COCO-layout dataset (registered with the built-in COCO panoptic+semantic layout) writes every
    PQ / AP / mIoU metric, and they equal the metrics computed here from our own forward passes."""
    parity = parity_dir
    require_shared(parity / "tiny_panoptic.yaml"), require_shared(parity / "tiny_panoptic.pkl")
    root = tmp_path / "datasets"
    prefix = registered(root, names=["coco_2017_val_panoptic_with_sem_seg"])
    name = prefix + "coco_2017_val_panoptic_with_sem_seg"
    out_dir = tmp_path / "out"
    opts = ["MODEL.WEIGHTS", str(parity / "tiny_panoptic.pkl"), "DATASETS.TEST", f"('{name}',)",
            "OUTPUT_DIR", str(out_dir), "DATALOADER.NUM_WORKERS", "0"]
    from mask2former import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(parity / "tiny_panoptic.yaml"))
    cfg.merge_from_list(opts)
    # The random-weight model finds nothing of the drawn shapes (every metric would be 0, and
    # 0 == 0 proves little), so the first image's GT is the model's own prediction on it:
    # then PQ, AP and mIoU are non-trivial.
    coco = make_coco(root)
    coco = make_coco(root, override={IMAGE_IDS[0]: _prediction_as_gt(cfg, coco, IMAGE_IDS[0])})
    train_net = _load_train_net()
    from mask2former.engine.defaults import default_argument_parser

    args = default_argument_parser().parse_args(
        ["--eval-only", "--config-file", str(parity / "tiny_panoptic.yaml")] + opts)
    train_net.main(args)

    results = json.loads((out_dir / "eval_results.json").read_text())
    assert set(results) >= {"panoptic_seg", "segm", "sem_seg"}
    expected_keys = {
        "panoptic_seg": ["PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"],
        "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
        "sem_seg": ["mIoU", "fwIoU", "mACC", "pACC"],
    }
    # No GT object is large (> 96^2 pixels): COCO leaves APl undefined. Everything else is defined.
    undefined = {("segm", "APl")}
    areas = [a["area"] for a in json.loads(Path(coco["json_file"]).read_text())["annotations"]
             if not a["iscrowd"]]
    assert max(areas) < 96 ** 2 and min(areas) < 32 ** 2 and any(32 ** 2 < a < 96 ** 2 for a in areas)
    for task, keys in expected_keys.items():
        for key in keys:
            assert key in results[task], (task, key)
            v = _metric(results[task][key])
            if (task, key) in undefined:
                assert math.isnan(v), (task, key, v)
            else:
                assert 0.0 <= v <= 100.0, (task, key, v)

    panoptic, sem, sem_present, segm = _direct_metrics(cfg, name, coco)
    assert panoptic["PQ"] > 0 and panoptic["PQ_th"] > 0 and segm["AP"] > 0 and sem["mIoU"] > 0
    for task, direct in (("panoptic_seg", panoptic), ("sem_seg", sem), ("segm", segm)):
        for key, value in direct.items():
            assert _metric(results[task][key]) == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), \
                (task, key)
    # per-class IoU is defined exactly for the classes present in the GT
    for key, present in sem_present.items():
        assert math.isnan(_metric(results["sem_seg"][key])) != present, key
    # the predictions went to OUTPUT_DIR/inference
    assert (out_dir / "inference" / "predictions.json").is_file()
    assert (out_dir / "inference" / "coco_instances_results.json").is_file()
