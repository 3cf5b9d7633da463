"""Cityscapes evaluators (cityscapesscripts): IoU / iIoU and instance AP on a generated gtFine layout.

Expected values are worked out by hand for small cases, and otherwise computed by calling
cityscapesscripts directly on prediction files written here in its formats.
"""
import logging
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.catalog import DatasetCatalog, MetadataCatalog
from mask2former.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    build_evaluators,
)
from mask2former.evaluation import cityscapes_evaluation as cse
from mask2former.evaluation.panoptic_evaluation import COCOPanopticEvaluator
from mask2former.structures import Instances
from tests.conftest import require_module

H, W = 32, 64
CITY = "frankfurt"
FRAMES = ("000019", "000294")
# Cityscapes label id -> train id for the classes used here
ROAD, SKY, PERSON, CAR, TRUCK = 7, 23, 24, 26, 27
TRAIN = {ROAD: 0, SKY: 10, PERSON: 11, CAR: 13, TRUCK: 14}
THING = {PERSON: 0, CAR: 2, TRUCK: 3}  # contiguous ids of the 8 thing classes


def _core(frame):
    return f"{CITY}_000000_{frame}"


def _instance_ids():
    """instanceIds of one image: unlabeled (0) rows 0-7, sky 8-11, road below, two cars and a
    person (all at least 100 pixels, the smallest instance size cityscapesscripts scores)."""
    ids = np.zeros((H, W), np.int32)
    ids[8:12] = SKY
    ids[12:] = ROAD
    ids[12:24, 4:20] = CAR * 1000          # 192 px
    ids[12:24, 32:44] = CAR * 1000 + 1     # 144 px
    ids[14:24, 50:60] = PERSON * 1000      # 100 px
    return ids


def _label_ids(inst):
    return np.where(inst >= 1000, inst // 1000, inst).astype(np.uint8)


@pytest.fixture
def cityscapes(tmp_path):
    """A two-image gtFine/val layout and a dataset name whose metadata points at it."""
    gt_dir = tmp_path / "cityscapes" / "gtFine" / "val"
    (gt_dir / CITY).mkdir(parents=True)
    inst = _instance_ids()
    for frame in FRAMES:
        Image.fromarray(inst.astype(np.uint16)).save(gt_dir / CITY / f"{_core(frame)}_gtFine_instanceIds.png")
        Image.fromarray(_label_ids(inst)).save(gt_dir / CITY / f"{_core(frame)}_gtFine_labelIds.png")
    name = f"_test_cs_{uuid.uuid4().hex[:8]}"
    ref = MetadataCatalog.get("cityscapes_fine_instance_seg_val")
    MetadataCatalog.get(name).set(stuff_classes=list(ref.stuff_classes),
                                  thing_classes=list(ref.thing_classes), gt_dir=str(gt_dir))
    yield name, gt_dir
    MetadataCatalog.remove(name)
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)


def _input(frame):
    return {"file_name": f"/data/leftImg8bit/val/{CITY}/{_core(frame)}_leftImg8bit.png",
            "image_id": _core(frame)}


def _scores(label_ids):
    """(19, H, W) one-hot scores of a label-id map; label ids without a train id -> road."""
    train = np.zeros(label_ids.shape, np.int64)
    for lid, tid in TRAIN.items():
        train[label_ids == lid] = tid
    return torch.nn.functional.one_hot(torch.from_numpy(train), 19).permute(2, 0, 1).float()


def _instances(masks, classes, scores):
    inst = Instances((H, W))
    inst.pred_masks = torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, H, W))
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    return inst


def _run(ev, outputs):
    ev.reset()
    for frame, out in zip(FRAMES, outputs):
        ev.process([_input(frame)], [out])
    return ev.evaluate()


# --------------------------------------------------------------------------- missing package
_EVAL_MODULES = ("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                 "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling")


def test_missing_cityscapesscripts_gives_install_hint(cityscapes, monkeypatch):
    name, _ = cityscapes
    # None in sys.modules makes every import of these names fail, as if not installed
    for mod in ("cityscapesscripts", "cityscapesscripts.evaluation", *_EVAL_MODULES):
        monkeypatch.setitem(sys.modules, mod, None)
    for cls in (CityscapesSemSegEvaluator, CityscapesInstanceEvaluator):
        with pytest.raises(ImportError, match=r'pip install cityscapesscripts.*mask2former\[cityscapes\]'):
            cls(name)

    from mask2former import get_cfg

    cfg = get_cfg()
    with pytest.raises(ImportError, match="pip install cityscapesscripts"):
        build_evaluators(cfg, "cityscapes_fine_sem_seg_val")
    with pytest.raises(ImportError, match="CityscapesInstanceEvaluator"):
        build_evaluators(cfg, "cityscapes_fine_instance_seg_val")


def test_build_evaluators_panoptic_without_cityscapesscripts(monkeypatch, caplog):
    """PQ still runs for a Cityscapes panoptic dataset; the other two are skipped with a warning."""
    from mask2former import get_cfg

    for mod in _EVAL_MODULES:
        monkeypatch.setitem(sys.modules, mod, None)
    cfg = get_cfg()
    t = cfg.MODEL.MASK_FORMER.TEST
    t.PANOPTIC_ON, t.SEMANTIC_ON, t.INSTANCE_ON = True, True, True
    with caplog.at_level(logging.WARNING, logger="mask2former.evaluation"):
        ev = build_evaluators(cfg, "cityscapes_fine_panoptic_val")
    assert isinstance(ev, COCOPanopticEvaluator)
    assert "CityscapesSemSegEvaluator is skipped" in caplog.text and "pip install" in caplog.text
    t.PANOPTIC_ON = False
    with pytest.raises(ImportError, match="pip install cityscapesscripts"):
        build_evaluators(cfg, "cityscapes_fine_panoptic_val")


# --------------------------------------------------------------------------- with cityscapesscripts
@pytest.fixture
def csscripts():
    """cityscapesscripts: optional for users, in the dev extra, so it must be there under CI=true."""
    return require_module("cityscapesscripts", "pip install cityscapesscripts (or the dev extra: pip install -e '.[dev]')")


def test_build_evaluators_follows_official_rule(csscripts):
    from mask2former import get_cfg

    cfg = get_cfg()
    assert isinstance(build_evaluators(cfg, "cityscapes_fine_sem_seg_val"), CityscapesSemSegEvaluator)
    assert isinstance(build_evaluators(cfg, "cityscapes_fine_instance_seg_val"), CityscapesInstanceEvaluator)
    t = cfg.MODEL.MASK_FORMER.TEST
    t.PANOPTIC_ON, t.SEMANTIC_ON, t.INSTANCE_ON = True, True, True
    ev = build_evaluators(cfg, "cityscapes_fine_panoptic_val")
    assert [type(e) for e in ev.evaluators] == [
        COCOPanopticEvaluator, CityscapesSemSegEvaluator, CityscapesInstanceEvaluator]
    t.PANOPTIC_ON, t.SEMANTIC_ON = False, False
    assert isinstance(build_evaluators(cfg, "cityscapes_fine_panoptic_val"), CityscapesInstanceEvaluator)


def test_semseg_perfect_prediction_ignores_void_pixels(csscripts, cityscapes):
    name, _ = cityscapes
    gt = _label_ids(_instance_ids())
    # the unlabeled rows (label id 0: no train id) are predicted as road; they do not count
    res = _run(CityscapesSemSegEvaluator(name), [{"sem_seg": _scores(gt)}] * 2)
    assert res == {"sem_seg": {"IoU": 100.0, "iIoU": 100.0, "IoU_sup": 100.0, "iIoU_sup": 100.0}}


def test_semseg_wrong_class_by_hand(csscripts, cityscapes, tmp_path):
    name, _ = cityscapes
    gt = _label_ids(_instance_ids())
    pred = gt.copy()
    pred[12:24, 32:44] = TRUCK  # the second car (144 px) predicted as a truck, in both images
    pred[0:8] = SKY  # void pixels predicted as sky: no false positives
    res = _run(CityscapesSemSegEvaluator(name, output_dir=str(tmp_path / "out")),
               [{"sem_seg": _scores(pred)}] * 2)["sem_seg"]
    # classes: road 1, sky 1, person 1, car 2*192 / (2*(192+144)), truck 0 / (2*144)
    car = 192 / (192 + 144)
    assert res["IoU"] == pytest.approx(100 * (3 + car) / 5)
    # instance-weighted: car instances weigh avgClassSize / size each, so car = 1 / (1 + 1);
    # truck 0 (only false positives), person 1
    assert res["iIoU"] == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    # categories flat, sky, human and vehicle (car and truck are both vehicles) are all exact
    assert res["IoU_sup"] == pytest.approx(100.0) and res["iIoU_sup"] == pytest.approx(100.0)
    # the kept predictions are label-id PNGs (the trainId -> labelId mapping)
    png = tmp_path / "out" / "cityscapes_sem_seg" / f"{_core(FRAMES[0])}_pred.png"
    assert np.array_equal(np.asarray(Image.open(png)), pred)


def test_semseg_matches_cityscapesscripts(csscripts, cityscapes, tmp_path, monkeypatch):
    name, gt_dir = cityscapes
    rng = np.random.default_rng(0)
    gt = _label_ids(_instance_ids())
    preds = []
    ids = np.array(sorted(TRAIN))
    for _ in FRAMES:
        p = gt.copy()
        noise = rng.random((H, W)) < 0.3
        p[noise] = rng.choice(ids, size=noise.sum())
        preds.append(p)
    res = _run(CityscapesSemSegEvaluator(name), [{"sem_seg": _scores(p)} for p in preds])["sem_seg"]

    # reference: the label-id PNGs written here, scored by cityscapesscripts itself (the module
    # is taken through the evaluator's import, which supplies np.in1d on NumPy >= 2.4)
    mod = cse._cityscapes_module("evalPixelLevelSemanticLabeling", "test")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    pred_files, gt_files = [], []
    for frame, p in zip(FRAMES, preds):
        Image.fromarray(p).save(ref_dir / f"{_core(frame)}_ref.png")
        pred_files.append(str(ref_dir / f"{_core(frame)}_ref.png"))
        gt_files.append(str(gt_dir / CITY / f"{_core(frame)}_gtFine_labelIds.png"))
    monkeypatch.setattr(mod.args, "quiet", True)
    monkeypatch.setattr(mod.args, "JSONOutput", False)
    ref = mod.evaluateImgLists(pred_files, gt_files, mod.args)
    assert res["IoU"] == pytest.approx(100 * ref["averageScoreClasses"])
    assert res["iIoU"] == pytest.approx(100 * ref["averageScoreInstClasses"])
    assert res["IoU_sup"] == pytest.approx(100 * ref["averageScoreCategories"])
    assert res["iIoU_sup"] == pytest.approx(100 * ref["averageScoreInstCategories"])
    assert 0 < res["IoU"] < 100


def test_semseg_without_images_and_bad_inputs(csscripts, cityscapes, caplog):
    name, gt_dir = cityscapes
    ev = CityscapesSemSegEvaluator(name)
    with caplog.at_level(logging.WARNING, logger="mask2former.evaluation"):
        assert ev.evaluate() == {}
    assert "no predictions" in caplog.text

    good = {"sem_seg": _scores(_label_ids(_instance_ids()))}
    with pytest.raises(ValueError, match=r"\(19, H, W\)"):
        ev.process([_input(FRAMES[0])], [{"sem_seg": torch.zeros(3, H, W)}])
    with pytest.raises(ValueError, match="prediction is 16x64 but the ground truth"):
        ev.process([_input(FRAMES[0])], [{"sem_seg": torch.zeros(19, 16, W)}])
    with pytest.raises(ValueError, match="<city>_<seq>_<frame>"):
        ev.process([{"file_name": "image.png"}], [good])
    with pytest.raises(FileNotFoundError, match="frankfurt_000000_000777_gtFine_labelIds.png"):
        ev.process([_input("000777")], [good])
    ev.process([_input(FRAMES[0])], [good])
    with pytest.raises(ValueError, match="processed twice"):
        ev.process([_input(FRAMES[0])], [good])
    # one of the two GT images processed: scored, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mask2former.evaluation"):
        assert ev.evaluate()["sem_seg"]["IoU"] == 100.0
    assert "Only 1 of the 2 images" in caplog.text

    os.remove(gt_dir / CITY / f"{_core(FRAMES[1])}_gtFine_instanceIds.png")
    with pytest.raises(FileNotFoundError, match="_gtFine_instanceIds.png does not exist"):
        ev.process([_input(FRAMES[1])], [good])
    MetadataCatalog.get(name + "_nogt").set(stuff_classes=list(MetadataCatalog.get(name).stuff_classes))
    try:
        with pytest.raises(ValueError, match="needs metadata 'gt_dir'"):
            CityscapesSemSegEvaluator(name + "_nogt")
    finally:
        MetadataCatalog.remove(name + "_nogt")
    MetadataCatalog.get(name + "_bad").set(stuff_classes=["road", "lava"], gt_dir=str(gt_dir))
    try:
        with pytest.raises(ValueError, match=r"\['lava'\] that are not Cityscapes classes"):
            CityscapesSemSegEvaluator(name + "_bad")
    finally:
        MetadataCatalog.remove(name + "_bad")


def _gt_masks():
    ids = _instance_ids()
    return {"car0": ids == CAR * 1000, "car1": ids == CAR * 1000 + 1, "person": ids == PERSON * 1000}


def test_instance_perfect_empty_and_wrong_class(csscripts, cityscapes):
    name, _ = cityscapes
    m = _gt_masks()
    ev = CityscapesInstanceEvaluator(name)
    perfect = _instances([m["car0"], m["car1"], m["person"]], [THING[CAR]] * 2 + [THING[PERSON]],
                         [0.9, 0.8, 0.7])
    assert _run(ev, [{"instances": perfect}] * 2) == {"segm": {"AP": 100.0, "AP50": 100.0}}
    # no instance predicted: AP 0 for the classes with GT (the others are not averaged)
    assert _run(ev, [{"instances": _instances([], [], [])}] * 2) == {"segm": {"AP": 0.0, "AP50": 0.0}}
    # cars predicted as trucks: car AP 0, person AP 1, truck (no GT) not averaged
    wrong = _instances([m["car0"], m["car1"], m["person"]], [THING[TRUCK]] * 2 + [THING[PERSON]],
                       [0.9, 0.8, 0.7])
    assert _run(ev, [{"instances": wrong}] * 2) == {"segm": {"AP": 50.0, "AP50": 50.0}}


def test_instance_matches_cityscapesscripts(csscripts, cityscapes, tmp_path, monkeypatch):
    name, gt_dir = cityscapes
    m = _gt_masks()
    shifted = np.roll(m["car0"], 3, axis=1)  # IoU 156 / 228 = 0.68: a hit at 0.5..0.65 only
    void_fp = np.zeros((H, W), bool)
    void_fp[0:8, 0:30] = True  # on void pixels: ignored, not a false positive
    fp = np.zeros((H, W), bool)
    fp[24:32, 0:30] = True  # on road: a false positive
    preds = [
        ([shifted, m["car1"], m["person"], void_fp], [CAR, CAR, PERSON, CAR], [0.6, 0.9, 0.8, 0.95]),
        ([m["car0"], fp, m["person"]], [CAR, CAR, PERSON], [0.7, 0.85, 0.3]),
    ]
    outputs = [{"instances": _instances(ms, [THING[c] for c in cs], ss)} for ms, cs, ss in preds]
    res = _run(CityscapesInstanceEvaluator(name), outputs)["segm"]

    # reference: txt + mask files written here, scored by cityscapesscripts' evaluateImgLists
    mod = cse._cityscapes_module("evalInstanceLevelSemanticLabeling", "test")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    pred_files, gt_files = [], []
    for frame, (ms, cs, ss) in zip(FRAMES, preds):
        lines = []
        for i, (mask, c, s) in enumerate(zip(ms, cs, ss)):
            Image.fromarray(mask.astype(np.uint8) * 255).save(ref_dir / f"{_core(frame)}_m{i}.png")
            lines.append(f"{_core(frame)}_m{i}.png {c} {s}\n")
        (ref_dir / f"{_core(frame)}_ref.txt").write_text("".join(lines))
        pred_files.append(str(ref_dir / f"{_core(frame)}_ref.txt"))
        gt_files.append(str(gt_dir / CITY / f"{_core(frame)}_gtFine_instanceIds.png"))
    # evaluateImgLists dumps its GT cache and matches.json (into the working directory), which
    # fails on NumPy 2 integers; the dumps do not affect the result
    monkeypatch.setattr(mod, "writeDict2JSON", lambda *args: None)
    for key, value in (("quiet", True), ("JSONOutput", False), ("predictionPath", str(ref_dir)),
                       ("gtInstancesFile", str(tmp_path / "gtInstances.json"))):
        monkeypatch.setattr(mod.args, key, value)
    ref = mod.evaluateImgLists(pred_files, gt_files, mod.args)["averages"]
    assert res["AP"] == pytest.approx(100 * ref["allAp"])
    assert res["AP50"] == pytest.approx(100 * ref["allAp50%"])
    assert 0 < res["AP"] < res["AP50"] < 100


def test_instance_bad_inputs(csscripts, cityscapes):
    name, _ = cityscapes
    ev = CityscapesInstanceEvaluator(name)
    with pytest.raises(KeyError, match="no 'instances'"):
        ev.process([_input(FRAMES[0])], [{"sem_seg": torch.zeros(19, H, W)}])
    with pytest.raises(ValueError, match="must index the 8 thing_classes"):
        ev.process([_input(FRAMES[0])], [{"instances": _instances([np.ones((H, W))], [8], [0.5])}])


def test_distributed_gather(csscripts, cityscapes, monkeypatch):
    """Rank 1's prediction files reach rank 0, which scores both images."""
    name, _ = cityscapes
    m = _gt_masks()
    out = {"instances": _instances([m["car0"], m["car1"], m["person"]],
                                   [THING[CAR]] * 2 + [THING[PERSON]], [0.9, 0.8, 0.7])}
    ranks = [CityscapesInstanceEvaluator(name), CityscapesInstanceEvaluator(name)]
    for frame, ev in zip(FRAMES, ranks):
        ev.process([_input(frame)], [out])
    state = {"rank": 1, "sent": None}
    monkeypatch.setattr(cse.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(cse.comm, "synchronize", lambda: None)
    monkeypatch.setattr(cse.comm, "is_main_process", lambda: state["rank"] == 0)

    def gather(obj):
        if state["rank"] == 1:
            state["sent"] = obj
            return []
        return [obj, state["sent"]]

    monkeypatch.setattr(cse.comm, "gather", gather)
    assert ranks[1].evaluate() == {}
    assert len(state["sent"][1]) == 4  # three mask PNGs and the txt of rank 1's image
    state["rank"] = 0
    assert ranks[0].evaluate() == {"segm": {"AP": 100.0, "AP50": 100.0}}
    assert Path(ranks[0]._pred_dir, f"{_core(FRAMES[1])}_pred.txt").read_text().count("\n") == 3
    # the same image on two ranks is an error
    ranks[0].process([_input(FRAMES[1])], [out])
    with pytest.raises(ValueError, match="processed by two processes"):
        ranks[0].evaluate()
