"""``train_net.py --eval-only`` through its command line on every built-in dataset family, and
string image ids in the panoptic evaluator.

Each family test writes two 64x96 images in the family's official layout under a temporary
``$DETECTRON2_DATASETS`` (tests/tiny_layouts.py), builds the family's official R50 config with
tiny widths and the dataset's real class count, saves its random weights (fixed seed), runs it
here on the images and builds the ground truth from its own predictions, altered in known ways:

* semantic: the predicted labels with a 16x24 block set to the ignore label and another one to
  the next class; mIoU / fwIoU / mACC / pACC are counted here from the two label maps;
* panoptic: the predicted segments, one of which (in the last image) gets another category of
  its kind: that one is a false positive and a false negative, every other segment a match with
  IoU 1, so PQ / SQ / RQ follow from counting;
* instances: the best-scoring predicted masks over both images: AP, AP50 and AP75 are 100, and
  so is the AP of each class with GT (the others' are NaN).

Families: COCO (panoptic with semantic PNGs and instance AP, instances, COCO-Stuff-10k), ADE20K
(panoptic with semantic and instance AP, semantic, instances, ADE20K-full), Mapillary Vistas
(panoptic, semantic), Cityscapes (panoptic; its semantic and instance metrics, and the instance
dataset, need cityscapesscripts and are skipped with that reason without it).

Category ids are mapped with the category tables of mask2former/data/metadata (the data), not
with the package's code. ``python train_net.py --eval-only ...`` then runs in a subprocess, and
its eval_results.json must hold the official evaluators' tasks and metric names, and these values.
"""
import json
import math
import os
import subprocess
import sys
import uuid
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_layouts as tl
from tests.conftest import skip_or_fail_in_ci
from mask2former import get_cfg
from mask2former.data import build_mapper
from mask2former.data.catalog import DatasetCatalog, MetadataCatalog
from mask2former.data.datasets.register import register_coco_panoptic
from mask2former.data.ids import id2rgb
from mask2former.engine import Trainer
from mask2former.evaluation import COCOPanopticEvaluator

REPO = Path(__file__).resolve().parents[1]
METADATA = REPO / "mask2former" / "data" / "metadata"
HAS_CITYSCAPES = find_spec("cityscapesscripts") is not None
NO_CITYSCAPES = "cityscapesscripts is not installed (pip install cityscapesscripts): the Cityscapes evaluators need it"

TINY = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
        "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
        # random weights give low scores: keep the masks they predict
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
        "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.3",
        "INPUT.MIN_SIZE_TEST", str(tl.H), "INPUT.MAX_SIZE_TEST", str(tl.W),
        "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SEED", "0"]

PAN_NAMES = {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"}


def _config(family, task):
    return {"coco": f"configs/coco/{task}-segmentation/maskformer2_R50_bs16_50ep.yaml",
            "ade20k": f"configs/ade20k/{task}-segmentation/maskformer2_R50_bs16_160k.yaml",
            "cityscapes": f"configs/cityscapes/{task}-segmentation/maskformer2_R50_bs16_90k.yaml",
            "mapillary": f"configs/mapillary-vistas/{task}-segmentation/maskformer{'' if task == 'panoptic' else '2'}"
                         "_R50_bs16_300k.yaml"}[family]


def _categories(name):
    return json.loads((METADATA / f"{name}.json").read_text())


def _sem_names(classes):
    classes = list(classes)
    return {"mIoU", "fwIoU", "mACC", "pACC"} | {f"IoU-{c}" for c in classes} | {f"ACC-{c}" for c in classes}


def _segm_names(classes):
    return {"AP", "AP50", "AP75", "APs", "APm", "APl"} | {f"AP-{c}" for c in classes}


def _ap_expected(insts, name_of):
    """AP, AP50, AP75 100 (see :func:`tiny_layouts.instance_gt`); per class 100 with GT, NaN without."""
    with_gt = {cat for image in insts for _, cat in image}
    res = {f"AP-{name}": 100.0 if cat in with_gt else math.nan for cat, name in name_of.items()}
    return dict(res, AP=100.0, AP50=100.0, AP75=100.0)


# --------------------------------------------------------------------------- predictions and oracles
def _predict(cfg_file, opts, files, weights):
    """Build the tiny model (seed 0), save its weights and run it on ``files`` here."""
    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / cfg_file))
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    torch.save({"model": model.state_dict()}, weights)
    mapper = build_mapper(cfg, False)
    preds = []
    for path, image_id in files:
        with torch.inference_mode():
            out = model([mapper({"file_name": str(path), "image_id": image_id})])[0]
        p = tl.Prediction()
        if "sem_seg" in out:
            p.sem = out["sem_seg"].argmax(0).numpy()
        if "panoptic_seg" in out:
            seg, infos = out["panoptic_seg"]
            p.pan = (seg.numpy().astype(np.int64), [(s["id"], s["category_id"], bool(s["isthing"])) for s in infos])
        if "instances" in out:
            inst = out["instances"]
            masks = (inst.pred_masks > 0.5).numpy()
            p.inst = list(zip(masks, inst.pred_classes.tolist(), inst.scores.tolist()))
        preds.append(p)
    return preds


def _sem_expected(preds, gts, ignore, names=(), classes_seen_in="gt"):
    """mIoU, fwIoU, mACC, pACC and IoU-<name> of every class in ``names`` (percent) over all
    images. IoU is averaged over the classes in the GT (Detectron2's SemSegEvaluator), or in
    ``"either"`` GT or prediction (the Cityscapes script)."""
    p = np.concatenate([x.ravel() for x in preds])
    g = np.concatenate([x.ravel() for x in gts])
    valid = g != ignore
    p, g = p[valid], g[valid]
    res = {f"IoU-{n}": math.nan for n in names}
    ious, accs, fw = [], [], 0.0
    for c in np.union1d(p, g):
        tp, n_gt, n_pred = np.sum((p == c) & (g == c)), np.sum(g == c), np.sum(p == c)
        iou = tp / (n_gt + n_pred - tp)
        if n_gt or classes_seen_in == "either":
            ious.append(iou)
        if n_gt:
            accs.append(tp / n_gt)
            fw += iou * n_gt / g.size
            if names:
                res[f"IoU-{names[c]}"] = 100 * iou
    return dict(res, mIoU=100 * np.mean(ious), fwIoU=100 * fw, mACC=100 * np.mean(accs), pACC=100 * np.mean(p == g))


def _pq_expected(pairs, isthing_of):
    tp, fp, fn = Counter(), Counter(), Counter()
    for gt_cat, pred_cat in pairs:
        if gt_cat == pred_cat:
            tp[gt_cat] += 1
        else:
            fp[pred_cat] += 1
            fn[gt_cat] += 1
    res = {}
    for suffix, kind in (("", None), ("_th", True), ("_st", False)):
        cats = [c for c in set(tp) | set(fp) | set(fn) if kind is None or bool(isthing_of[c]) == kind]
        rq = [tp[c] / (tp[c] + fp[c] / 2 + fn[c] / 2) for c in cats]  # every match has IoU 1: PQ = RQ
        sq = [1.0 if tp[c] else 0.0 for c in cats]
        for name, values in (("PQ", rq), ("SQ", sq), ("RQ", rq)):
            res[name + suffix] = 100 * float(np.mean(values)) if cats else math.nan
    return res


# --------------------------------------------------------------------------- running train_net.py
def _setup(tmp_path, family, cfg_file, test_sets, extra=()):
    """Images of ``family``, the options of the run and the model's predictions on the images."""
    root = tmp_path / "datasets"
    files = tl.write_images(root, family)
    weights = tmp_path / "model.pth"
    opts = TINY + ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "out"),
                   "DATASETS.TEST", repr(tuple(test_sets)), *extra]
    return root, opts, _predict(cfg_file, opts, files, weights)


def _eval_only(tmp_path, cfg_file, opts):
    env = {k: v for k, v in os.environ.items() if k != "M2F_DATASETS_YAML"}
    env["DETECTRON2_DATASETS"] = str(tmp_path / "datasets")
    cmd = [sys.executable, "train_net.py", "--eval-only", "--config-file", cfg_file, *opts]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    return json.loads((tmp_path / "out" / "eval_results.json").read_text()), r.stdout + r.stderr


def _check(results, names, expected):
    """``results`` ({metric: value}) has exactly ``names`` and the ``expected`` values."""
    assert set(results) == set(names), sorted(set(results) ^ set(names))[:10]
    for key, value in expected.items():
        got = float(results[key])  # NaN comes back as the string "nan"
        assert got == pytest.approx(value, abs=1e-6, nan_ok=True), (key, got, value)


# --------------------------------------------------------------------------- the families
def check_coco_panoptic_with_sem_seg(tmp_path, cfg_file, extra=()):
    """--eval-only of ``cfg_file`` (+ ``extra`` options) on coco_2017_val_panoptic_with_sem_seg: PQ,
    mask AP (instances_val2017.json) and mIoU (panoptic_semseg_val2017) equal the counted values."""
    root, opts, preds = _setup(tmp_path, "coco", cfg_file, ["coco_2017_val_panoptic_with_sem_seg"], extra)
    cats = _categories("coco_panoptic")
    c2d, isthing = [c["id"] for c in cats], [bool(c["isthing"]) for c in cats]
    pans, pairs = tl.panoptic_gt(preds, c2d, isthing)
    sems = [tl.semantic_gt(p.sem, len(cats), 255) for p in preds]
    insts = tl.instance_gt(preds, c2d)
    things = [c for c in cats if c["isthing"]]
    tl.write_annotations(root, "coco", [dict(sem=s, pan=pa, inst=i) for s, pa, i in zip(sems, pans, insts)],
                         pan_categories=cats, inst_categories=things)
    res, _ = _eval_only(tmp_path, cfg_file, opts)
    assert list(res) == ["panoptic_seg", "segm", "sem_seg"]  # the official order
    _check(res["panoptic_seg"], PAN_NAMES, _pq_expected(pairs, dict(zip(c2d, isthing))))
    thing_names = {c["id"]: c["name"] for c in things}
    _check(res["segm"], _segm_names(thing_names.values()), _ap_expected(insts, thing_names))
    names = [c["name"] for c in cats]
    _check(res["sem_seg"], _sem_names(names), _sem_expected([p.sem for p in preds], sems, 255, names))
    return preds


@pytest.mark.slow
def test_eval_only_coco_panoptic_with_sem_seg(tmp_path):
    """PQ, mask AP (INSTANCE_ON: instances_val2017.json) and mIoU (panoptic_semseg_val2017)."""
    check_coco_panoptic_with_sem_seg(tmp_path, _config("coco", "panoptic"))


@pytest.mark.slow
@pytest.mark.parametrize("family,test_set,categories", [
    ("coco", "coco_2017_val", "coco_panoptic"),  # the thing classes of COCO panoptic
    ("ade20k", "ade20k_instance_val", "ade20k_instance_100"),
])
def test_eval_only_instances(tmp_path, family, test_set, categories):
    cfg_file = _config(family, "instance")
    root, opts, preds = _setup(tmp_path, family, cfg_file, [test_set])
    cats = [c for c in _categories(categories) if c.get("isthing", 1)]
    insts = tl.instance_gt(preds, [c["id"] for c in cats])
    tl.write_annotations(root, family, [dict(inst=i) for i in insts], inst_categories=cats)
    res, _ = _eval_only(tmp_path, cfg_file, opts)
    assert list(res) == ["segm"]
    names = {c["id"]: c["name"] for c in cats}
    _check(res["segm"], _segm_names(names.values()), _ap_expected(insts, names))


@pytest.mark.slow
@pytest.mark.parametrize("family,test_set,categories,ignore", [
    ("coco_stuff_10k", "coco_2017_test_stuff_10k_sem_seg", "coco_stuff_171", 255),
    ("ade20k_full", "ade20k_full_sem_seg_val", "ade20k_847", 65535),  # 16-bit TIFF labels
])
def test_eval_only_semantic_only_families(tmp_path, family, test_set, categories, ignore):
    """The semantic datasets without a config of their own: the ADE20K semantic config with the
    dataset's class count."""
    cats = sorted(_categories(categories), key=lambda c: c.get("trainId", 0))  # trainId: ADE20K-full
    cfg_file = _config("ade20k", "semantic")
    root, opts, preds = _setup(tmp_path, family, cfg_file, [test_set],
                               ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(len(cats))])
    sems = [tl.semantic_gt(p.sem, len(cats), ignore) for p in preds]
    tl.write_annotations(root, family, [dict(sem=s) for s in sems])
    res, _ = _eval_only(tmp_path, cfg_file, opts)
    assert list(res) == ["sem_seg"]
    names = [c["name"] for c in cats]
    _check(res["sem_seg"], _sem_names(names), _sem_expected([p.sem for p in preds], sems, ignore, names))


@pytest.mark.slow
def test_eval_only_ade20k_panoptic_and_semantic(tmp_path):
    """ade20k_panoptic_val (mIoU always, PQ, AP against ade20k_instance_val.json; string image
    ids) and ade20k_sem_seg_val, which shares its label PNGs, in one run."""
    cfg_file = _config("ade20k", "panoptic")
    root, opts, preds = _setup(tmp_path, "ade20k", cfg_file, ["ade20k_panoptic_val", "ade20k_sem_seg_val"])
    cats = _categories("ade20k_150")
    c2d, isthing = [c["id"] for c in cats], [bool(c["isthing"]) for c in cats]
    pans, pairs = tl.panoptic_gt(preds, c2d, isthing)
    sems = [tl.semantic_gt(p.sem, len(cats), 255) for p in preds]
    insts = tl.instance_gt(preds, c2d)
    inst_cats = _categories("ade20k_instance_100")
    tl.write_annotations(root, "ade20k", [dict(sem=s, pan=pa, inst=i) for s, pa, i in zip(sems, pans, insts)],
                         pan_categories=cats, inst_categories=inst_cats)
    res, _ = _eval_only(tmp_path, cfg_file, opts)
    pan, sem = res["ade20k_panoptic_val"], res["ade20k_sem_seg_val"]
    assert list(pan) == ["sem_seg", "panoptic_seg", "segm"] and list(sem) == ["sem_seg"]
    names = [c["name"] for c in cats]
    expected_sem = _sem_expected([p.sem for p in preds], sems, 255, names)
    _check(pan["sem_seg"], _sem_names(names), expected_sem)
    _check(sem["sem_seg"], _sem_names(names), expected_sem)
    _check(pan["panoptic_seg"], PAN_NAMES, _pq_expected(pairs, dict(zip(c2d, isthing))))
    # AP per class under the panoptic dataset's class names (ADE20K-150's, not the instance json's)
    things = {c["id"]: c["name"] for c in cats if c["isthing"]}
    _check(pan["segm"], _segm_names(things.values()), _ap_expected(insts, things))


@pytest.mark.slow
def test_eval_only_mapillary_vistas_panoptic_and_semantic(tmp_path):
    """mapillary_vistas_panoptic_val (PQ, mIoU; labels 0..64 with 65 = ignore) and
    mapillary_vistas_sem_seg_val, which reads the same labels/, in one run."""
    cfg_file = _config("mapillary", "panoptic")
    root, opts, preds = _setup(tmp_path, "mapillary_vistas", cfg_file,
                               ["mapillary_vistas_panoptic_val", "mapillary_vistas_sem_seg_val"])
    cats = _categories("mapillary_vistas_panoptic")
    c2d, isthing = [c["id"] for c in cats], [bool(c["isthing"]) for c in cats]
    pans, pairs = tl.panoptic_gt(preds, c2d, isthing)
    sems = [tl.semantic_gt(p.sem, len(cats), 65) for p in preds]
    tl.write_annotations(root, "mapillary_vistas", [dict(sem=s, pan=pa) for s, pa in zip(sems, pans)],
                         pan_categories=cats)
    res, _ = _eval_only(tmp_path, cfg_file, opts)
    pan, sem = res["mapillary_vistas_panoptic_val"], res["mapillary_vistas_sem_seg_val"]
    assert list(pan) == ["panoptic_seg", "sem_seg"] and list(sem) == ["sem_seg"]
    _check(pan["panoptic_seg"], PAN_NAMES, _pq_expected(pairs, dict(zip(c2d, isthing))))
    names = [c["name"] for c in cats]
    _check(pan["sem_seg"], _sem_names(names), _sem_expected([p.sem for p in preds], sems, 65, names))
    readable = [c["readable"] for c in _categories("mapillary_vistas_sem_seg") if c["evaluate"]]
    _check(sem["sem_seg"], _sem_names(readable), _sem_expected([p.sem for p in preds], sems, 65, readable))


def _cityscapes_ids(train_ids, instances, cats):
    """labelIds / instanceIds of Cityscapes train ids (255: label id 0, "unlabeled") with the
    ``[(mask, label id)]`` instances pasted as label id * 1000."""
    lut = np.zeros(256, np.int64)
    lut[[c["trainId"] for c in cats]] = [c["id"] for c in cats]
    label_ids = lut[train_ids]
    instance_ids = label_ids.copy()
    for mask, label in instances:
        instance_ids[mask] = label * 1000
    return label_ids, instance_ids


@pytest.mark.slow
def test_eval_only_cityscapes_panoptic(tmp_path):
    """cityscapes_fine_panoptic_val: PQ; with cityscapesscripts also the Cityscapes IoU (against
    *_gtFine_labelIds.png) and AP (*_gtFine_instanceIds.png), and cityscapes_fine_sem_seg_val.
    Without it, the semantic and instance evaluators are skipped with a warning."""
    cfg_file = _config("cityscapes", "panoptic")
    test_sets = ["cityscapes_fine_panoptic_val"] + (["cityscapes_fine_sem_seg_val"] if HAS_CITYSCAPES else [])
    root, opts, preds = _setup(tmp_path, "cityscapes", cfg_file, test_sets)
    cats = sorted(_categories("cityscapes"), key=lambda c: c["trainId"])
    c2d, isthing = [c["id"] for c in cats], [bool(c["isthing"]) for c in cats]
    pans, pairs = tl.panoptic_gt(preds, c2d, isthing)
    sems = [tl.semantic_gt(p.sem, len(cats), 255) for p in preds]
    insts = tl.instance_gt(preds, c2d, n=1)  # Cityscapes instances do not overlap: one
    for image_id, sem, inst in zip(tl.LAYOUTS["cityscapes"]["ids"], sems, insts):
        tl.write_cityscapes_ids(root, image_id, *_cityscapes_ids(sem, inst, cats))
    tl.write_annotations(root, "cityscapes", [dict(sem=s, pan=pa) for s, pa in zip(sems, pans)],
                         pan_categories=[dict(c, isthing=int(c["isthing"])) for c in cats])
    res, log = _eval_only(tmp_path, cfg_file, opts)
    expected_pq = _pq_expected(pairs, dict(zip(c2d, isthing)))
    if not HAS_CITYSCAPES:
        assert list(res) == ["panoptic_seg"] and "CityscapesSemSegEvaluator is skipped" in log
        _check(res["panoptic_seg"], PAN_NAMES, expected_pq)
        skip_or_fail_in_ci("PQ checked; IoU and AP need cityscapesscripts: " + NO_CITYSCAPES)
    pan, sem = res["cityscapes_fine_panoptic_val"], res["cityscapes_fine_sem_seg_val"]
    assert list(pan) == ["panoptic_seg", "sem_seg", "segm"] and list(sem) == ["sem_seg"]
    _check(pan["panoptic_seg"], PAN_NAMES, expected_pq)
    expected_iou = {"IoU": _sem_expected([p.sem for p in preds], sems, 255, classes_seen_in="either")["mIoU"]}
    for r in (pan["sem_seg"], sem["sem_seg"]):
        _check(r, {"IoU", "iIoU", "IoU_sup", "iIoU_sup"}, expected_iou)
    _check(pan["segm"], {"AP", "AP50"}, {"AP": 100.0, "AP50": 100.0})


@pytest.mark.slow
def test_eval_only_cityscapes_instances(tmp_path):
    if not HAS_CITYSCAPES:
        skip_or_fail_in_ci(NO_CITYSCAPES)
    cfg_file = _config("cityscapes", "instance")
    root, opts, preds = _setup(tmp_path, "cityscapes", cfg_file, ["cityscapes_fine_instance_seg_val"])
    cats = sorted(_categories("cityscapes"), key=lambda c: c["trainId"])
    things = [c for c in cats if c["isthing"]]
    insts = tl.instance_gt(preds, [c["id"] for c in things], n=1)
    for image_id, inst in zip(tl.LAYOUTS["cityscapes"]["ids"], insts):
        tl.write_cityscapes_ids(root, image_id, *_cityscapes_ids(np.full((tl.H, tl.W), 0), inst, cats))
    res, _ = _eval_only(tmp_path, cfg_file, opts)
    assert list(res) == ["segm"]
    _check(res["segm"], {"AP", "AP50"}, {"AP": 100.0, "AP50": 100.0})


# --------------------------------------------------------------------------- string image ids
def test_panoptic_evaluator_string_image_ids(tmp_path):
    """A COCO-panoptic json with string image ids (ADE20K's "ADE_val_00000001", and a string of
    digits) loaded by the COCO-panoptic loader and evaluated: the ids stay as the json has them,
    and PQ is the hand-computed value.

    4x6 images, thing category 1 in columns 0-2 and stuff category 2 in columns 3-5 of both GTs.
    Image "ADE_val_00000001": thing predicted on columns 0-1 (IoU 8/12), stuff on 2-5 (IoU 12/16).
    Image "000123": thing on 3-5, stuff on 0-2: two false positives and two false negatives.
    Thing: PQ = (2/3) / (1 + 1/2 + 1/2) = 1/3, SQ = 2/3, RQ = 1/2; stuff: PQ = 0.75 / 2, SQ = 0.75.
    """
    name = f"_strids_{uuid.uuid4().hex[:8]}"
    ids = ["ADE_val_00000001", "000123"]
    gt = np.zeros((4, 6), np.int64)
    gt[:, :3], gt[:, 3:] = 1, 2
    for d in ("img", "pan"):
        (tmp_path / d).mkdir()
    for i in ids:
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        Image.fromarray(id2rgb(gt)).save(tmp_path / "pan" / f"{i}.png")
    segs = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 12},
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": 12}]
    (tmp_path / "pan.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 4, "width": 6} for i in ids],
        "annotations": [{"image_id": i, "file_name": f"{i}.png", "segments_info": segs} for i in ids],
        "categories": [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]}))
    meta = {"thing_dataset_id_to_contiguous_id": {1: 0}, "stuff_dataset_id_to_contiguous_id": {2: 1}}
    register_coco_panoptic(name, meta, str(tmp_path / "img"), str(tmp_path / "pan"), str(tmp_path / "pan.json"))
    try:
        dicts = DatasetCatalog.get(name)
        assert [d["image_id"] for d in dicts] == ids
        pred = {ids[0]: np.array([1, 1, 2, 2, 2, 2]), ids[1]: np.array([2, 2, 2, 1, 1, 1])}
        ev = COCOPanopticEvaluator(name, str(tmp_path / "out"))
        ev.reset()
        for d in dicts:
            seg = torch.from_numpy(np.tile(pred[d["image_id"]], (4, 1)))
            ev.process([d], [{"panoptic_seg": (seg, [{"id": 1, "category_id": 0, "isthing": True},
                                                     {"id": 2, "category_id": 1, "isthing": False}])}])
        res = ev.evaluate()["panoptic_seg"]
        expected = {"PQ": 100 * (1 / 3 + 0.375) / 2, "SQ": 100 * (2 / 3 + 0.75) / 2, "RQ": 50.0,
                    "PQ_th": 100 / 3, "SQ_th": 200 / 3, "RQ_th": 50.0, "PQ_st": 37.5, "SQ_st": 75.0, "RQ_st": 50.0}
        _check(res, PAN_NAMES, expected)
        written = json.loads((tmp_path / "out" / "predictions.json").read_text())
        assert [a["image_id"] for a in written["annotations"]] == ids
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
