"""``python -m mask2former.data.prepare``: COCO-Stuff-10k, ADE20K-full, ADE20K panoptic and
instance conversions on tiny generated downloads, read back through the built-in loaders.

(``ade20k_sem_seg`` and ``coco_panoptic_semseg`` are covered in tests/test_datasets.py.)
"""
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import scipy.io
from PIL import Image

from mask2former.data import DatasetCatalog, prepare
from mask2former.data.datasets.builtin import register_all_builtin
from mask2former.data.datasets.custom import unregister

META = Path(__file__).resolve().parents[1] / "mask2former" / "data" / "metadata"
ADE150 = json.loads((META / "ade20k_150.json").read_text())
ADE_INST = json.loads((META / "ade20k_instance_100.json").read_text())


@pytest.fixture
def registered():
    """``reg(root, names)`` registers built-in datasets under ``root`` with a fresh prefix."""
    made = []

    def reg(root, names):
        prefix = f"p{uuid.uuid4().hex[:8]}_"
        made.extend(register_all_builtin(str(root), prefix=prefix, names=names))
        return prefix

    yield reg
    unregister(made)


def _main(task, root):
    return prepare.main([task, "--root", str(root), "--workers", "2"])


# --------------------------------------------------------------------------- COCO-Stuff-10k
def _make_coco_stuff(root, names_len=183):
    """cocostuff-10k layout, labels in the v1.1 convention (0 = unlabeled, COCO ids) unless
    ``names_len`` is 172 (v1.0: 1 = unlabeled, 2..172)."""
    base = root / "coco" / "coco_stuff_10k"
    for d in ("images", "annotations", "imageLists"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
              "test": ["COCO_train2014_000000000079"]}
    labels = {}
    for split, names in splits.items():
        (base / "imageLists" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(base / "images" / f"{name}.jpg")
            s = np.zeros((12, 20), np.uint8)
            if names_len == 172:
                s[:] = 1
                s[:, 5:10], s[:, 10:15], s[:, 15:] = 2, 82, 172
            else:
                s[:, 5:10], s[:, 10:15], s[:, 15:] = 1, 92, 182  # person, banner, wood
            names_arr = np.array([f"class{i}" for i in range(names_len)], dtype=object)
            scipy.io.savemat(base / "annotations" / f"{name}.mat", {"S": s, "names": names_arr})
            labels[(split, name)] = s
    return base, labels


@pytest.mark.parametrize("names_len", [183, 172], ids=["v1.1", "v1.0"])
def test_coco_stuff_10k(tmp_path, registered, names_len):
    base, labels = _make_coco_stuff(tmp_path, names_len)
    assert _main("coco_stuff_10k", tmp_path) == 0
    # both conventions: unlabeled 255; person 0, the first stuff class (banner) 80, wood 170
    expected = np.zeros((12, 20), np.uint8)
    expected[:, :5], expected[:, 5:10], expected[:, 10:15], expected[:, 15:] = 255, 0, 80, 170
    for (split, name) in labels:
        got = np.asarray(Image.open(base / "annotations_detectron2" / split / f"{name}.png"))
        np.testing.assert_array_equal(got, expected)
        assert (base / "images_detectron2" / split / f"{name}.jpg").read_bytes() == \
            (base / "images" / f"{name}.jpg").read_bytes()
    prefix = registered(tmp_path, ["coco_2017_train_stuff_10k_sem_seg"])
    dicts = DatasetCatalog.get(prefix + "coco_2017_train_stuff_10k_sem_seg")
    assert [Path(d["sem_seg_file_name"]).stem for d in dicts] == \
        ["COCO_train2014_000000000077", "COCO_train2014_000000000078"]


def test_coco_stuff_10k_errors(tmp_path, monkeypatch, capsys):
    assert _main("coco_stuff_10k", tmp_path) == 1
    assert "imageLists/train.txt not found" in capsys.readouterr().err

    base, labels = _make_coco_stuff(tmp_path)
    mat = base / "annotations" / "COCO_train2014_000000000078.mat"
    s = np.zeros((12, 20), np.uint8)
    s[0, 0] = 12  # a COCO id that COCO-Stuff does not use
    scipy.io.savemat(mat, {"S": s})
    with pytest.raises(ValueError, match=r"000078\.mat: label values \[12\] are not 0 \(unlabeled\)"):
        prepare.read_coco_stuff_10k_mat(str(mat))
    assert _main("coco_stuff_10k", tmp_path) == 1

    scipy.io.savemat(mat, {"L": s})
    with pytest.raises(ValueError, match=r"no variable 'S'.*\['L'\]"):
        prepare.read_coco_stuff_10k_mat(str(mat))

    # a MATLAB v7.3 (HDF5) header, as in the v1.0 release: needs h5py
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM"
    mat.write_bytes(header + b"\0" * 512)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"MATLAB v7\.3 \(HDF5\).*pip install h5py"):
        prepare.read_coco_stuff_10k_mat(str(mat))

    mat.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match="not a readable MATLAB file"):
        prepare.read_coco_stuff_10k_mat(str(mat))


# --------------------------------------------------------------------------- ADE20K-full
def _seg_rgb(classes):
    """ADE20K *_seg.png colours of an object-class map: R = class // 256 * 10, G = class % 256."""
    c = np.asarray(classes)
    return np.stack([c // 256 * 10, c % 256, np.zeros_like(c)], -1).astype(np.uint8)


def test_ade20k_full(tmp_path, registered):
    full = tmp_path / "ADE20K_2021_17_01"
    train_dir = full / "images" / "ADE" / "training" / "urban" / "street"
    val_dir = full / "images" / "ADE" / "validation" / "home"
    train_dir.mkdir(parents=True)
    val_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    wall, building, unknown = 2978, 312, 1  # train ids 0, 1; class 1 is not among the 847
    small = np.full((10, 16), wall)
    small[:, 8:] = building
    small[0, :4] = unknown
    Image.fromarray(rng.integers(0, 255, (10, 16, 3), dtype=np.uint8)).save(val_dir / "ADE_val_00000001.jpg")
    Image.fromarray(_seg_rgb(small)).save(val_dir / "ADE_val_00000001_seg.png")
    big = np.full((514, 530), building)  # shorter side 514 > 512: resized to 512 x 528
    big[:257] = wall
    Image.fromarray(rng.integers(0, 255, (514, 530, 3), dtype=np.uint8)).save(train_dir / "ADE_train_00000001.jpg")
    Image.fromarray(_seg_rgb(big)).save(train_dir / "ADE_train_00000001_seg.png")

    assert _main("ade20k_full", tmp_path) == 0
    got = np.asarray(Image.open(full / "annotations_detectron2" / "validation" / "ADE_val_00000001.tif"))
    expected = np.where(small == wall, 0, 1).astype(np.uint16)
    expected[0, :4] = 65535
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, expected)
    lab = np.asarray(Image.open(full / "annotations_detectron2" / "training" / "ADE_train_00000001.tif"))
    img = Image.open(full / "images_detectron2" / "training" / "ADE_train_00000001.jpg")
    assert lab.shape == (512, 528) and img.size == (528, 512)
    assert set(np.unique(lab).tolist()) == {0, 1} and (lab[:250] == 0).all() and (lab[260:] == 1).all()
    assert Image.open(full / "images_detectron2" / "validation" / "ADE_val_00000001.jpg").size == (16, 10)

    prefix = registered(tmp_path, ["ade20k_full_sem_seg_val"])
    (d,) = DatasetCatalog.get(prefix + "ade20k_full_sem_seg_val")
    assert Path(d["sem_seg_file_name"]).name == "ADE_val_00000001.tif"

    (val_dir / "ADE_val_00000001_seg.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000001_seg.png"):
        prepare.convert_ade20k_full(str(tmp_path), workers=1)
    assert _main("ade20k_full", tmp_path / "nowhere") == 1


# --------------------------------------------------------------------------- ADE20K panoptic / instances
WALL, FLOOR, PERSON, BED = 1, 4, 13, 8  # scene-parsing labels (class id + 1)
INST = {c["id"]: k + 1 for k, c in enumerate(ADE_INST)}  # ADE20K-150 id -> instance class 1..100


def _make_ade(root):
    """One image per split: wall (top), floor (bottom), a person labelled in both maps, a second
    person only in the semantic map (left void) and a bed instance over part of the floor."""
    ade = root / "ADEChallengeData2016"
    h, w = 16, 24
    sem = np.full((h, w), WALL, np.uint8)
    sem[8:] = FLOOR
    sem[0:2, 0:2] = 0  # "other"
    sem[2:8, 2:6] = PERSON
    sem[2:8, 18:22] = PERSON  # no instance: void in panoptic
    ins = np.zeros((h, w, 3), np.uint8)
    ins[2:8, 2:6] = [INST[PERSON - 1], 1, 0]
    ins[10:14, 8:16] = [INST[BED - 1], 2, 0]
    for split, tag in (("training", "train"), ("validation", "val")):
        for d in ("images", "annotations", "annotations_instance"):
            (ade / d / split).mkdir(parents=True)
        stem = f"ADE_{tag}_00000001"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(ade / "images" / split / f"{stem}.jpg")
        Image.fromarray(sem).save(ade / "annotations" / split / f"{stem}.png")
        Image.fromarray(ins).save(ade / "annotations_instance" / split / f"{stem}.png")
    return ade, sem, ins


def test_ade20k_panoptic_and_instance(tmp_path, registered):
    ade, sem, ins = _make_ade(tmp_path)
    assert ADE150[PERSON - 1]["isthing"] and ADE150[BED - 1]["isthing"] and not ADE150[FLOOR - 1]["isthing"]
    for task in ("ade20k_sem_seg", "ade20k_panoptic", "ade20k_instance"):
        assert _main(task, tmp_path) == 0

    data = json.loads((ade / "ade20k_panoptic_val.json").read_text())
    assert data["images"] == [{"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg",
                               "width": 24, "height": 16}]
    assert [c["id"] for c in data["categories"]] == list(range(150))
    (ann,) = data["annotations"]
    rgb = np.asarray(Image.open(ade / "ade20k_panoptic_val" / ann["file_name"])).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    cat_of = {s["id"]: s["category_id"] for s in ann["segments_info"]}
    assert sorted(cat_of.values()) == sorted([WALL - 1, FLOOR - 1, PERSON - 1, BED - 1])
    expected = np.full(sem.shape, -1)
    expected[sem == WALL] = WALL - 1
    expected[sem == FLOOR] = FLOOR - 1
    expected[ins[..., 1] == 1] = PERSON - 1
    expected[ins[..., 1] == 2] = BED - 1
    got = np.vectorize(lambda i: cat_of.get(i, -1))(ids)
    np.testing.assert_array_equal(got, expected)  # "other" and the un-instanced person are void
    for s in ann["segments_info"]:
        mask = ids == s["id"]
        ys, xs = np.nonzero(mask)
        assert s["area"] == mask.sum() and s["iscrowd"] == 0
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]

    inst = json.loads((ade / "ade20k_instance_train.json").read_text())
    assert [a["category_id"] for a in inst["annotations"]] == [PERSON - 1, BED - 1]
    assert [a["id"] for a in inst["annotations"]] == [1, 2]
    assert inst["categories"][0] == {"id": ADE_INST[0]["id"], "name": ADE_INST[0]["name"]}
    person = inst["annotations"][0]
    assert person["bbox"] == [2, 2, 4, 6] and person["area"] == 24
    np.testing.assert_array_equal(mask_util.decode(person["segmentation"]), ins[..., 1] == 1)

    prefix = registered(tmp_path, ["ade20k_panoptic_val", "ade20k_instance_val"])
    (pan,) = DatasetCatalog.get(prefix + "ade20k_panoptic_val")
    assert {s["isthing"] for s in pan["segments_info"]} == {True, False}
    assert Path(pan["file_name"]).name == "ADE_val_00000001.jpg"
    (d,) = DatasetCatalog.get(prefix + "ade20k_instance_val")
    assert len(d["annotations"]) == 2


def test_ade20k_panoptic_errors(tmp_path, capsys):
    ade, sem, ins = _make_ade(tmp_path)
    bad = ins.copy()
    bad[2, 2, 0] = INST[BED - 1]  # instance 1 with two classes
    with pytest.raises(ValueError, match=r"broken\.png: instance 1 has class values"):
        prepare.ade20k_panoptic_of(sem, bad, "broken.png")
    bad = ins.copy()
    bad[0, 0] = [0, 3, 0]  # an instance without a class
    with pytest.raises(ValueError, match=r"instance 3 has class values \[0\]"):
        prepare.ade20k_instance_annotations(bad, "x", "x.png")
    with pytest.raises(ValueError, match="instance map is 16x23"):
        prepare.ade20k_panoptic_of(sem, ins[:, :23], "x")
    (ade / "annotations_instance" / "validation" / "ADE_val_00000001.png").unlink()
    assert _main("ade20k_instance", tmp_path) == 1
    assert "annotations_instance.tar" in capsys.readouterr().err


def test_unreadable_annotation_is_reported(tmp_path, capsys):
    """A truncated label PNG stops the conversion with an error naming the file (not a
    traceback), as a missing one does with what to unpack."""
    ade, _, _ = _make_ade(tmp_path)
    png = ade / "annotations" / "validation" / "ADE_val_00000001.png"
    png.write_bytes(png.read_bytes()[:40])
    for task in ("ade20k_sem_seg", "ade20k_panoptic"):
        assert _main(task, tmp_path) == 1
        err = capsys.readouterr().err
        assert str(png) in err and "cannot be read as an image" in err, err
    png.unlink()
    assert _main("ade20k_panoptic", tmp_path) == 1
    assert f"{png} not found: unzip ADEChallengeData2016.zip" in capsys.readouterr().err


def test_tasks_come_from_the_families(capsys):
    """Each subcommand is a family's conversion; the command line offers exactly those."""
    from mask2former.data.catalog import builtin_families

    table = prepare.tasks()
    assert sorted(table) == ["ade20k_full", "ade20k_instance", "ade20k_panoptic", "ade20k_sem_seg",
                             "coco_panoptic_semseg", "coco_stuff_10k"]
    owners = {name: f.__name__.rsplit(".", 1)[1] for f in builtin_families() for name in f.PREPARE}
    assert all(name.startswith(owners[name].split("_")[0]) for name in table)
    assert table["coco_stuff_10k"] is prepare.convert_coco_stuff_10k
    with pytest.raises(SystemExit):
        prepare.main(["no_such_task"])
    assert "invalid choice: 'no_such_task'" in capsys.readouterr().err
