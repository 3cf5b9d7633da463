"""Evaluators: PQ, COCO mask AP, semantic-segmentation metrics and the inference loop.

Expected values are computed by hand (PQ, mIoU, ...) or with pycocotools called directly (AP).
"""
import contextlib
import io
import json
import math
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mask2former.data.catalog import DatasetCatalog, MetadataCatalog
from mask2former.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    InstanceSegEvaluator,
    SemSegEvaluator,
    build_evaluators,
    inference_on_dataset,
    pq_compute_single,
)
from mask2former.evaluation.panoptic_evaluation import PQStat, id2rgb, pq_results, rgb2id
from mask2former.structures import Boxes, Instances


@pytest.fixture
def dataset_name():
    """A fresh dataset name; its catalog entries are removed afterwards."""
    name = f"_test_eval_{uuid.uuid4().hex[:8]}"
    yield name
    MetadataCatalog.remove(name)
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)


def _approx(a, b, tol=1e-6):
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return abs(a - b) <= tol


# --------------------------------------------------------------------------- #
# Panoptic quality
# --------------------------------------------------------------------------- #
# Dataset categories: 1 person (thing), 2 car (thing), 3 sky (stuff), 4 grass (stuff, never
# present). Contiguous ids: person 0, car 1, sky 2, grass 3.
PAN_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]
THING_TABLE = {1: 0, 2: 1}
STUFF_TABLE = {3: 2, 4: 3}


def _pan_fixture():
    """Two 10x10 images. Returns [(gt_seg, gt_segments, pred_seg, pred_segments_contiguous)].

    Image 1 (no VOID):
      GT  person (id 1) rows 0-4 cols 0-4 (25 px) -> predicted exactly: TP, IoU 1
      GT  car    (id 2) rows 0-4 cols 5-9 (25 px) -> predicted VOID: FN
      GT  sky    (id 3) rows 5-9          (50 px) -> predicted rows 5-7 (30 px): TP, IoU 0.6
    Image 2:
      GT  VOID rows 0-1 (20 px)
      GT  crowd person (id 5) rows 2-5 cols 0-4 (20 px)
      GT  sky (id 6) rows 2-9 cols 5-9 (40 px)
      GT  car (id 7) rows 6-9 cols 0-4 (20 px) -> covered by a person prediction: FN
      pred person (id 1) on the crowd person region: ignored (not FP)
      pred car (id 2) rows 0-1 cols 0-4: all on VOID: ignored
      pred person (id 3) rows 6-9 cols 0-4 (on GT car): FP person
      pred sky (id 4) rows 0-9 cols 5-9 (50 px, 10 on VOID): IoU = 40 / (50 + 40 - 40 - 10) = 1
    Totals: person TP 1 (IoU 1), FP 1; car FN 2; sky TP 2 (IoU 0.6 + 1.0); grass absent.
    """
    gt1 = np.zeros((10, 10), np.int64)
    gt1[0:5, 0:5] = 1
    gt1[0:5, 5:10] = 2
    gt1[5:10, :] = 3
    gt1_segs = [
        {"id": 1, "category_id": 1, "iscrowd": 0, "area": 25},
        {"id": 2, "category_id": 2, "iscrowd": 0, "area": 25},
        {"id": 3, "category_id": 3, "iscrowd": 0, "area": 50},
    ]
    pr1 = np.zeros((10, 10), np.int64)
    pr1[0:5, 0:5] = 1
    pr1[5:8, :] = 2
    pr1_segs = [
        {"id": 1, "category_id": 0, "isthing": True},
        {"id": 2, "category_id": 2, "isthing": False},
    ]

    gt2 = np.zeros((10, 10), np.int64)
    gt2[2:6, 0:5] = 5
    gt2[2:10, 5:10] = 6
    gt2[6:10, 0:5] = 7
    gt2_segs = [
        {"id": 5, "category_id": 1, "iscrowd": 1, "area": 20},
        {"id": 6, "category_id": 3, "iscrowd": 0, "area": 40},
        {"id": 7, "category_id": 2, "iscrowd": 0, "area": 20},
    ]
    pr2 = np.zeros((10, 10), np.int64)
    pr2[2:6, 0:5] = 1
    pr2[0:2, 0:5] = 2
    pr2[6:10, 0:5] = 3
    pr2[:, 5:10] = 4
    pr2_segs = [
        {"id": 1, "category_id": 0, "isthing": True},
        {"id": 2, "category_id": 1, "isthing": True},
        {"id": 3, "category_id": 0, "isthing": True},
        {"id": 4, "category_id": 2, "isthing": False},
    ]
    return [(gt1, gt1_segs, pr1, pr1_segs), (gt2, gt2_segs, pr2, pr2_segs)]


_C2D = {0: 1, 1: 2, 2: 3, 3: 4}

# By hand: person PQ = 1 / (1 + 0.5) = 2/3, SQ 1, RQ 2/3; car PQ = SQ = RQ = 0;
# sky PQ = SQ = 1.6 / 2 = 0.8, RQ 1; grass excluded.
EXPECTED_PQ = {
    "PQ": 100 * (2 / 3 + 0 + 0.8) / 3,
    "SQ": 100 * (1 + 0 + 0.8) / 3,
    "RQ": 100 * (2 / 3 + 0 + 1) / 3,
    "PQ_th": 100 * (2 / 3) / 2,
    "SQ_th": 100 * 1 / 2,
    "RQ_th": 100 * (2 / 3) / 2,
    "PQ_st": 80.0,
    "SQ_st": 80.0,
    "RQ_st": 100.0,
}


def _to_dataset_ids(segs):
    return [{"id": s["id"], "category_id": _C2D[s["category_id"]]} for s in segs]


def test_pq_compute_single_by_hand():
    total = PQStat()
    for gt, gt_segs, pr, pr_segs in _pan_fixture():
        total += pq_compute_single(gt, gt_segs, pr, _to_dataset_ids(pr_segs), PAN_CATEGORIES)
    s = total.pq_per_cat
    assert (s[1].tp, s[1].fp, s[1].fn) == (1, 1, 0) and _approx(s[1].iou, 1.0)
    assert (s[2].tp, s[2].fp, s[2].fn) == (0, 0, 2)
    assert (s[3].tp, s[3].fp, s[3].fn) == (2, 0, 0) and _approx(s[3].iou, 1.6)
    assert 4 not in s or (s[4].tp, s[4].fp, s[4].fn) == (0, 0, 0)
    res = pq_results(total, PAN_CATEGORIES)
    assert (res["All"]["n"], res["Things"]["n"], res["Stuff"]["n"]) == (3, 2, 1)
    assert _approx(100 * res["All"]["pq"], EXPECTED_PQ["PQ"])
    assert _approx(res["per_class"][1]["pq"], 2 / 3)


def test_pq_single_rules():
    cats = PAN_CATEGORIES
    gt = np.zeros((2, 10), np.int64)
    gt[:, :] = 1  # one person, 20 px
    # IoU exactly 0.5 is not a match (strictly greater is required).
    pr = np.zeros((2, 10), np.int64)
    pr[:, :5] = 1
    pr[:, 5:] = 2
    st = pq_compute_single(gt, [{"id": 1, "category_id": 1, "area": 20}], pr,
                           [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}], cats)
    assert (st[1].tp, st[1].fn, st[1].fp, st[2].fp) == (0, 1, 1, 1)
    # A crowd region only excuses predictions of its own category.
    st = pq_compute_single(gt, [{"id": 1, "category_id": 1, "iscrowd": 1, "area": 20}], pr,
                           [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}], cats)
    assert (st[1].tp, st[1].fn, st[1].fp, st[2].fp) == (0, 0, 0, 1)
    # A prediction at most half on VOID is a false positive; more than half: ignored.
    gt = np.zeros((1, 10), np.int64)
    gt[0, 5:] = 1
    pr = np.zeros((1, 10), np.int64)
    pr[0, 0:4] = 1   # 4 px, all VOID -> ignored
    pr[0, 4:8] = 2   # 4 px, 1 on VOID -> FP car
    pr[0, 8:10] = 3  # person, 2 px on a 5-px GT person: IoU 0.4 -> FP, GT FN
    st = pq_compute_single(
        gt, [{"id": 1, "category_id": 1, "area": 5}], pr,
        [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 2}, {"id": 3, "category_id": 1}], cats,
    )
    assert (st[2].fp, st[1].fp, st[1].fn, st[1].tp) == (1, 1, 1, 0)
    # GT area missing -> counted from the map; RGB maps accepted.
    st = pq_compute_single(id2rgb(gt), [{"id": 1, "category_id": 1}], gt, [{"id": 1, "category_id": 1}], cats)
    assert st[1].tp == 1 and _approx(st[1].iou, 1.0)


def test_pq_single_errors():
    gt = np.ones((2, 2), np.int64)
    gseg = [{"id": 1, "category_id": 1, "area": 4}]
    with pytest.raises(ValueError, match="not in its segments_info"):
        pq_compute_single(gt, gseg, np.full((2, 2), 9), [], PAN_CATEGORIES)
    with pytest.raises(ValueError, match="no pixel"):
        pq_compute_single(gt, gseg, gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}],
                          PAN_CATEGORIES)
    with pytest.raises(ValueError, match="not a category"):
        pq_compute_single(gt, gseg, gt, [{"id": 1, "category_id": 99}], PAN_CATEGORIES)
    with pytest.raises(ValueError, match="shape"):
        pq_compute_single(gt, gseg, np.ones((3, 2), np.int64), [{"id": 1, "category_id": 1}], PAN_CATEGORIES)


def _register_panoptic(name, tmp_path):
    root = tmp_path / "pan_gt"
    root.mkdir()
    images, annotations = [], []
    for i, (gt, gt_segs, _, _) in enumerate(_pan_fixture()):
        image_id = 100 + i
        Image.fromarray(id2rgb(gt)).save(root / f"{image_id:012d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 10, "width": 10})
        annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": gt_segs})
    pan_json = tmp_path / "pan_gt.json"
    pan_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": PAN_CATEGORIES}))
    MetadataCatalog.get(name).set(
        panoptic_json=str(pan_json), panoptic_root=str(root), label_divisor=1000,
        thing_dataset_id_to_contiguous_id=THING_TABLE, stuff_dataset_id_to_contiguous_id=STUFF_TABLE,
        evaluator_type="coco_panoptic_seg",
    )


def _pan_batches():
    inputs, outputs = [], []
    for i, (_, _, pr, pr_segs) in enumerate(_pan_fixture()):
        inputs.append({"image_id": 100 + i, "file_name": f"/imgs/{100 + i:012d}.jpg"})
        outputs.append({"panoptic_seg": (torch.from_numpy(pr).to(torch.int32), [dict(s) for s in pr_segs])})
    return inputs, outputs


def test_coco_panoptic_evaluator(dataset_name, tmp_path):
    _register_panoptic(dataset_name, tmp_path)
    out_dir = tmp_path / "out"
    ev = COCOPanopticEvaluator(dataset_name, str(out_dir))
    ev.reset()
    inputs, outputs = _pan_batches()
    ev.process(inputs[:1], outputs[:1])
    ev.process(inputs[1:], outputs[1:])
    res = ev.evaluate()
    assert list(res) == ["panoptic_seg"]
    assert set(res["panoptic_seg"]) == set(EXPECTED_PQ)
    for k, v in EXPECTED_PQ.items():
        assert _approx(res["panoptic_seg"][k], v), (k, res["panoptic_seg"][k], v)

    # Written predictions: COCO panoptic json (dataset ids) + PNGs that decode to the input maps.
    pred = json.loads((out_dir / "predictions.json").read_text())
    assert [c["id"] for c in pred["categories"]] == [1, 2, 3, 4]
    anns = {a["image_id"]: a for a in pred["annotations"]}
    assert anns[101]["file_name"] == "000000000101.png"
    assert sorted(s["category_id"] for s in anns[101]["segments_info"]) == [1, 1, 2, 3]
    assert all("isthing" not in s for s in anns[101]["segments_info"])
    decoded = rgb2id(np.asarray(Image.open(out_dir / "predictions" / "000000000101.png")))
    np.testing.assert_array_equal(decoded, _pan_fixture()[1][2])


def test_coco_panoptic_evaluator_label_divisor_and_void(dataset_name, tmp_path):
    """segments_info=None: class * label_divisor + instance ids, -1 VOID (Detectron2 convention)."""
    _register_panoptic(dataset_name, tmp_path)
    _, _, pr, _ = _pan_fixture()[0]
    seg = np.full((10, 10), -1, np.int32)
    seg[pr == 1] = 0 * 1000 + 0   # person instance
    seg[pr == 2] = 2 * 1000       # sky
    ev = COCOPanopticEvaluator(dataset_name, require_all_images=False)
    ev.reset()
    ev.process([{"image_id": 100}], [{"panoptic_seg": (torch.from_numpy(seg), None)}])
    res = ev.evaluate()["panoptic_seg"]
    # Image 1 alone: person TP IoU 1, car FN, sky TP IoU 0.6.
    assert _approx(res["PQ"], 100 * (1 + 0 + 0.6) / 3)
    assert _approx(res["PQ_st"], 60.0) and _approx(res["RQ_th"], 50.0)


def test_coco_panoptic_evaluator_errors(dataset_name, tmp_path):
    _register_panoptic(dataset_name, tmp_path)
    inputs, outputs = _pan_batches()
    ev = COCOPanopticEvaluator(dataset_name)
    ev.reset()
    with pytest.raises(ValueError, match="image id 999"):
        ev.process([{"image_id": 999}], outputs[:1])
    bad = (outputs[0]["panoptic_seg"][0], [{"id": 1, "category_id": 7, "isthing": True},
                                           {"id": 2, "category_id": 2, "isthing": False}])
    with pytest.raises(ValueError, match="thing_dataset_id_to_contiguous_id"):
        ev.process(inputs[:1], [{"panoptic_seg": bad}])
    ev.reset()
    ev.process(inputs[:1], outputs[:1])
    with pytest.raises(ValueError, match="no prediction"):
        ev.evaluate()
    MetadataCatalog.get(dataset_name + "_nojson")
    with pytest.raises(ValueError, match="panoptic_json"):
        COCOPanopticEvaluator(dataset_name + "_nojson")
    MetadataCatalog.remove(dataset_name + "_nojson")


# --------------------------------------------------------------------------- #
# Instance segmentation AP
# --------------------------------------------------------------------------- #
INST_CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
INST_TABLE = {3: 0, 7: 1}


def _box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(m):
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _register_instances(name, tmp_path):
    h, w = 64, 64
    gts = {  # image id -> list of (category, mask, iscrowd); the 40x40 dog is "medium"
        1: [(3, _box_mask(h, w, 0, 10, 0, 10), 0), (7, _box_mask(h, w, 20, 60, 20, 60), 0),
            (3, _box_mask(h, w, 12, 18, 0, 30), 1)],
        2: [(7, _box_mask(h, w, 5, 15, 5, 15), 0), (3, _box_mask(h, w, 20, 30, 0, 40), 0)],
    }
    anns, k = [], 1
    for image_id, items in gts.items():
        for cat, m, crowd in items:
            r = _rle(m)
            anns.append({"id": k, "image_id": image_id, "category_id": cat, "segmentation": r,
                         "area": float(m.sum()), "bbox": [float(v) for v in mask_util.toBbox(r)],
                         "iscrowd": crowd})
            k += 1
    data = {"images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i in gts],
            "annotations": anns, "categories": INST_CATS}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    MetadataCatalog.get(name).set(json_file=str(path), thing_dataset_id_to_contiguous_id=INST_TABLE,
                                  thing_classes=["cat", "dog"], evaluator_type="coco")
    return path


def _inst_predictions():
    """image id -> list of (contiguous class, mask, score)."""
    h, w = 64, 64
    return {
        1: [(0, _box_mask(h, w, 0, 10, 0, 9), 0.9),     # cat, IoU 0.9
            (1, _box_mask(h, w, 20, 60, 20, 44), 0.8),  # dog, IoU 0.6
            (0, _box_mask(h, w, 12, 18, 0, 20), 0.7),   # on the crowd cat: ignored
            (1, _box_mask(h, w, 0, 5, 30, 40), 0.95)],  # false positive dog
        2: [(1, _box_mask(h, w, 5, 15, 5, 14), 0.6),    # dog, IoU 0.9
            (0, _box_mask(h, w, 0, 3, 0, 3), 0.5)],     # false positive cat; GT cat missed
    }


def _instances(items, h=64, w=64):
    if not items:
        return Instances((h, w), pred_masks=torch.zeros(0, h, w), scores=torch.zeros(0),
                         pred_classes=torch.zeros(0, dtype=torch.int64), pred_boxes=Boxes(torch.zeros(0, 4)))
    masks = torch.from_numpy(np.stack([m for _, m, _ in items])).float()
    return Instances((h, w), pred_masks=masks, scores=torch.tensor([s for _, _, s in items]),
                     pred_classes=torch.tensor([c for c, _, _ in items]), pred_boxes=Boxes(torch.zeros(len(items), 4)))


def _direct_cocoeval(json_path, preds, iou_type="segm", cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        results = []
        for image_id, items in preds.items():
            for c, m, s in items:
                r = {"image_id": image_id, "category_id": [3, 7][c], "score": s}
                rle = _rle(m)
                if iou_type == "segm":
                    r["segmentation"] = rle
                else:
                    r["bbox"] = [float(v) for v in mask_util.toBbox(rle)]
                results.append(r)
        if results:
            dt = gt.loadRes(results)
        else:
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _expected_from_stats(stats):
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    return {n: (100 * stats[i] if stats[i] >= 0 else float("nan")) for i, n in enumerate(names)}


def _run_instance_eval(name, preds, **kw):
    ev = InstanceSegEvaluator(name, **kw)
    ev.reset()
    for image_id, items in preds.items():
        ev.process([{"image_id": image_id}], [{"instances": _instances(items)}])
    return ev.evaluate()


def test_instance_ap_matches_pycocotools(dataset_name, tmp_path):
    json_path = _register_instances(dataset_name, tmp_path)
    preds = _inst_predictions()
    res = _run_instance_eval(dataset_name, preds, tasks=("segm", "bbox"), output_dir=str(tmp_path / "o"))
    assert list(res) == ["segm", "bbox"]
    for task in ("segm", "bbox"):
        expected = _expected_from_stats(_direct_cocoeval(json_path, preds, task))
        for k, v in expected.items():
            assert _approx(res[task][k], v), (task, k, res[task][k], v)
        for cat_id, cname in [(3, "cat"), (7, "dog")]:
            exp = 100 * _direct_cocoeval(json_path, preds, task, cat_ids=[cat_id])[0]
            assert _approx(res[task][f"AP-{cname}"], exp), (task, cname)
    assert 0 < res["segm"]["AP"] < 100 and 0 < res["segm"]["APm"] < 100
    assert math.isnan(res["segm"]["APl"])  # no large GT object
    dumped = json.loads((tmp_path / "o" / "coco_instances_results.json").read_text())
    assert len(dumped) == 6 and {d["category_id"] for d in dumped} == {3, 7}


def test_instance_ap_empty_predictions(dataset_name, tmp_path):
    json_path = _register_instances(dataset_name, tmp_path)
    preds = {1: [], 2: []}
    res = _run_instance_eval(dataset_name, preds)["segm"]
    expected = _expected_from_stats(_direct_cocoeval(json_path, preds))
    assert res["AP"] == 0.0 and res["AP-cat"] == 0.0 and res["AP-dog"] == 0.0
    for k, v in expected.items():
        assert _approx(res[k], v), (k, res[k], v)


def test_instance_evaluator_errors(dataset_name, tmp_path):
    _register_instances(dataset_name, tmp_path)
    ev = InstanceSegEvaluator(dataset_name)
    ev.reset()
    good = _inst_predictions()[1]
    with pytest.raises(ValueError, match="image id 12345"):
        ev.process([{"image_id": 12345}], [{"instances": _instances(good)}])
    with pytest.raises(ValueError, match="not in the thing_dataset_id_to_contiguous_id"):
        ev.process([{"image_id": 1}], [{"instances": _instances([(5, good[0][1], 0.9)])}])
    with pytest.raises(ValueError, match="20x20"):
        ev.process([{"image_id": 1}], [{"instances": _instances([(0, np.ones((20, 20), bool), 0.9)], 20, 20)}])
    MetadataCatalog.get(dataset_name + "_nojson")
    with pytest.raises(ValueError, match="json_file"):
        InstanceSegEvaluator(dataset_name + "_nojson")
    MetadataCatalog.remove(dataset_name + "_nojson")


# --------------------------------------------------------------------------- #
# Semantic segmentation
# --------------------------------------------------------------------------- #
def _scores(pred, k=4):
    """(K, H, W) scores whose argmax is ``pred``."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred), k).permute(2, 0, 1).float()


def test_sem_seg_metrics_by_hand(dataset_name, tmp_path):
    gt1 = np.array([[0, 0, 1, 1], [255, 255, 2, 2]], np.uint8)
    pr1 = np.array([[0, 1, 1, 1], [0, 3, 2, 3]])
    gt2 = np.array([[0, 2, 255, 1, 0]], np.uint8)
    pr2 = np.array([[0, 2, 2, 1, 1]])
    Image.fromarray(gt1).save(tmp_path / "a.png")
    Image.fromarray(gt2).save(tmp_path / "b.png")
    MetadataCatalog.get(dataset_name).set(stuff_classes=["a", "b", "c", "d"], ignore_label=255,
                                          evaluator_type="sem_seg")
    DatasetCatalog.register(dataset_name, lambda: [
        {"file_name": "a.jpg", "sem_seg_file_name": str(tmp_path / "a.png"), "height": 2, "width": 4},
        {"file_name": "b.jpg", "sem_seg_file_name": str(tmp_path / "b.png"), "height": 1, "width": 5},
    ])
    ev = SemSegEvaluator(dataset_name, output_dir=str(tmp_path / "o"))
    ev.reset()
    ev.process([{"file_name": "a.jpg"}], [{"sem_seg": _scores(pr1)}])  # GT via DatasetCatalog
    ev.process([{"file_name": "b.jpg", "sem_seg_file_name": str(tmp_path / "b.png")}],
               [{"sem_seg": _scores(pr2)}])                             # GT named by the input
    res = ev.evaluate()["sem_seg"]
    # Non-ignored (pred, gt) pairs: (0,0) x2, (1,0) x2, (1,1) x3, (2,2) x2, (3,2).
    # GT counts 4, 3, 3, 0; TP 2, 3, 2, 0; pred counts 2, 5, 2, 1.
    iou = [2 / (4 + 2 - 2), 3 / (3 + 5 - 3), 2 / (3 + 2 - 2)]
    acc = [2 / 4, 3 / 3, 2 / 3]
    assert _approx(res["mIoU"], 100 * sum(iou) / 3)
    assert _approx(res["fwIoU"], 100 * (4 * iou[0] + 3 * iou[1] + 3 * iou[2]) / 10)
    assert _approx(res["mACC"], 100 * sum(acc) / 3)
    assert _approx(res["pACC"], 100 * 7 / 10)
    for name, v in zip("abc", iou):
        assert _approx(res[f"IoU-{name}"], 100 * v)
    for name, v in zip("abc", acc):
        assert _approx(res[f"ACC-{name}"], 100 * v)
    assert math.isnan(res["IoU-d"]) and math.isnan(res["ACC-d"])  # class absent from the GT
    # the written predictions: per image and predicted class, the RLE of its pixels (no
    # category table in this metadata: the category id is the class index); and the metrics
    written = json.loads((tmp_path / "o" / "sem_seg_predictions.json").read_text())
    for file_name, pred in (("a.jpg", pr1), ("b.jpg", pr2)):
        entries = [e for e in written if e["file_name"] == file_name]
        assert sorted(e["category_id"] for e in entries) == sorted(np.unique(pred).tolist())
        rebuilt = np.full(pred.shape, -1)
        for e in entries:
            mask = mask_util.decode(e["segmentation"]).astype(bool)
            assert not (rebuilt[mask] >= 0).any()  # the class masks do not overlap
            rebuilt[mask] = e["category_id"]
        np.testing.assert_array_equal(rebuilt, pred)
    metrics = json.loads((tmp_path / "o" / "sem_seg_evaluation.json").read_text())  # NaN written as "nan"
    assert {k: float(v) for k, v in metrics.items()} == pytest.approx(res, nan_ok=True)


def test_sem_seg_errors(dataset_name, tmp_path):
    Image.fromarray(np.array([[0, 7]], np.uint8)).save(tmp_path / "bad.png")
    MetadataCatalog.get(dataset_name).set(stuff_classes=["a", "b"], ignore_label=255)
    with pytest.raises(ValueError, match="num_classes"):
        SemSegEvaluator(dataset_name, num_classes=3)
    ev = SemSegEvaluator(dataset_name)
    ev.reset()
    with pytest.raises(ValueError, match=r"GT labels \[7\]"):
        ev.process([{"sem_seg_file_name": str(tmp_path / "bad.png")}], [{"sem_seg": _scores([[0, 1]], 2)}])
    with pytest.raises(ValueError, match="prediction is"):
        ev.process([{"sem_seg_file_name": str(tmp_path / "bad.png")}], [{"sem_seg": _scores([[0, 1, 1]], 2)}])


# --------------------------------------------------------------------------- #
# Inference loop and evaluator plumbing
# --------------------------------------------------------------------------- #
class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, batch):
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        return [{"value": torch.tensor(float(x["x"]) * 2)} for x in batch]


class _SumEvaluator(DatasetEvaluator):
    def __init__(self, task="sum"):
        self.task = task

    def reset(self):
        self.total, self.count = 0.0, 0

    def process(self, inputs, outputs):
        for i, o in zip(inputs, outputs):
            self.total += float(o["value"])
            self.count += 1

    def evaluate(self):
        return {self.task: {"total": self.total, "count": self.count}}


def test_inference_on_dataset_with_fake_model():
    model = _FakeModel().train()
    loader = [[{"x": 1}, {"x": 2}], [{"x": 3}], [{"x": 4}, {"x": 5}]]
    res = inference_on_dataset(model, loader, _SumEvaluator(), log_period=0.0)
    assert res == {"sum": {"total": 30.0, "count": 5}}
    assert model.calls == [(False, True)] * 3  # eval mode, inference mode
    assert model.training  # restored

    # A list of evaluators is combined; None only runs the model; generators have no len.
    res = inference_on_dataset(model, iter(loader), [_SumEvaluator("a"), _SumEvaluator("b")])
    assert set(res) == {"a", "b"} and res["b"]["count"] == 5
    assert inference_on_dataset(model, loader, None) == {}
    with pytest.raises(KeyError, match="same task"):
        inference_on_dataset(model, loader, DatasetEvaluators([_SumEvaluator(), _SumEvaluator()]))


def test_build_evaluators(dataset_name, tmp_path):
    from mask2former import get_cfg

    _register_panoptic(dataset_name, tmp_path)
    MetadataCatalog.get(dataset_name).set(stuff_classes=["person", "car", "sky", "grass"], ignore_label=255)
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    assert isinstance(build_evaluators(cfg, dataset_name), COCOPanopticEvaluator)
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    ev = build_evaluators(cfg, dataset_name)
    assert [type(e) for e in ev.evaluators] == [COCOPanopticEvaluator, SemSegEvaluator]
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    with pytest.raises(NotImplementedError, match="No evaluator"):
        build_evaluators(cfg, dataset_name)
    # the Cityscapes types are covered in tests/test_cityscapes_evaluation.py

