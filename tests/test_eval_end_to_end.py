"""``train_net.py --eval-only`` end to end, through the real command line (a subprocess).

* Against the official numbers: ``../shared/eval/expected.json`` holds what the official
  Mask2Former ``train_net.py --eval-only`` printed (Detectron2's COCOPanopticEvaluator,
  COCOEvaluator for segm, SemSegEvaluator) for the tiny panoptic parity model on the 5-image set
  ``../shared/eval/datasets``. Our command on the same files must give every one of those
  numbers to 1e-4 (absolute, in the same percent units; they are printed to 4 decimals, so
  rounding alone accounts for up to 5e-5).
* The prediction files: the same run writes ``OUTPUT_DIR/inference/`` (``predictions.json`` and
  the panoptic PNGs of ``predictions/``, ``coco_instances_results.json``,
  ``sem_seg_predictions.json``), and each decodes to predictions of the set's images: panoptic
  PNGs whose segment ids are those of their ``segments_info``, instance RLEs at the image size,
  semantic RLEs that partition each image.
* Test-time augmentation: with ``TEST.AUG.ENABLED`` the command also evaluates the TTA model,
  as the official ``test_with_TTA`` does (files in ``inference_TTA/``, keys suffixed ``_TTA``,
  beside the plain results in ``eval_results.json``); those results equal a direct evaluation of
  ``build_tta_model(cfg, model)`` with the package's evaluator.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

import mask2former as m2f
from mask2former.data.ids import rgb2id
from tests.conftest import REPO

DATASET = "coco_2017_val_panoptic_with_sem_seg"
TOL = 1e-4
# What the issue asks to be checked at least; expected.json must carry these (so an emptied
# reference cannot pass), and every other number it has is checked as well.
REQUIRED = {
    "panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"},
    "segm": {"AP", "AP50", "AP75", "APl"},
    "sem_seg": {"mIoU", "fwIoU", "mACC", "pACC"},
}
# Small TTA settings so that the TTA run is quick; the plain test size shrinks with them.
TTA_OPTS = ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "400", "TEST.AUG.ENABLED", "True",
            "TEST.AUG.MIN_SIZES", "(128, 192)", "TEST.AUG.MAX_SIZE", "400", "TEST.AUG.FLIP", "True"]


def run_eval_only(eval_dir, parity_dir, out, *opts):
    """``train_net.py --eval-only`` on the shared set with the tiny panoptic model; returns
    ``OUTPUT_DIR/eval_results.json``."""
    cmd = [sys.executable, "train_net.py", "--eval-only", "--config-file", str(parity_dir / "tiny_panoptic.yaml"),
           "MODEL.WEIGHTS", str(parity_dir / "tiny_panoptic.pkl"), "DATASETS.TEST", f'("{DATASET}",)',
           "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu", *opts]
    env = dict(os.environ, DETECTRON2_DATASETS=str(eval_dir / "datasets"))
    env.pop("M2F_DATASETS_YAML", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"train_net.py --eval-only failed:\n{proc.stderr[-6000:]}"
    return json.loads((out / "eval_results.json").read_text())


def metric_differences(got: dict, expected: dict, tol: float = TOL):
    """``[(name, got, expected)]`` for each metric of ``expected`` that ``got`` lacks or that
    differs by more than ``tol`` (NaN equals only NaN; JSON files may hold it as a string)."""
    bad = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            bad.append((name, None, want))
            continue
        a, b = float(have), float(want)
        if math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                bad.append((name, have, want))
        elif abs(a - b) > tol:
            bad.append((name, have, want))
    return bad


def test_metric_differences_catches_each_kind():
    assert metric_differences({"PQ": 16.04028, "x": "nan"}, {"PQ": 16.0403, "x": float("nan")}) == []
    assert metric_differences({"PQ": 16.0405}, {"PQ": 16.0403}) == [("PQ", 16.0405, 16.0403)]
    assert metric_differences({}, {"AP": 1.0}) == [("AP", None, 1.0)]
    assert metric_differences({"AP": "nan"}, {"AP": 0.0}) == [("AP", "nan", 0.0)]


@pytest.fixture(scope="module")
def plain_run(eval_dir, parity_dir, tmp_path_factory):
    """One ``train_net.py --eval-only`` with the config as it is: (OUTPUT_DIR, eval_results.json)."""
    out = tmp_path_factory.mktemp("eval_only") / "out"
    return out, run_eval_only(eval_dir, parity_dir, out)


@pytest.mark.slow
def test_eval_only_matches_the_official_numbers(eval_dir, plain_run):
    expected = json.loads((eval_dir / "expected.json").read_text())
    tasks = {k: v for k, v in expected.items() if isinstance(v, dict)}
    for task, names in REQUIRED.items():
        assert names <= set(tasks.get(task, {})), f"expected.json lacks {task} {sorted(names)}"
    out, results = plain_run
    assert set(results) == set(tasks), f"tasks {sorted(results)}; the official run printed {sorted(tasks)}"
    bad = {task: metric_differences(results[task], want) for task, want in tasks.items()}
    assert not any(bad.values()), f"differences from the official numbers (ours, official): {bad}"
    assert not (out / "inference_TTA").exists()  # TEST.AUG.ENABLED is off in the config


def _rle_masks(entries, size):
    """Decoded (N, H, W) bool masks of COCO RLE ``segmentation`` entries, each of ``size``."""
    for e in entries:
        assert e["segmentation"]["size"] == list(size), e
    return mask_util.decode([e["segmentation"] for e in entries]).transpose(2, 0, 1).astype(bool)


@pytest.mark.slow
def test_eval_only_writes_decodable_prediction_files(eval_dir, plain_run):
    out, _ = plain_run
    inference = out / "inference"
    coco = eval_dir / "datasets" / "coco"
    gt = json.loads((coco / "annotations" / "panoptic_val2017.json").read_text())
    images = {im["id"]: im for im in gt["images"]}
    sizes = {i: (im["height"], im["width"]) for i, im in images.items()}
    panoptic_ids = {c["id"] for c in gt["categories"]}

    # panoptic: predictions.json is the GT json with the predictions as annotations, one per image
    pred = json.loads((inference / "predictions.json").read_text())
    assert pred["images"] == gt["images"] and pred["categories"] == gt["categories"]
    assert sorted(a["image_id"] for a in pred["annotations"]) == sorted(images)
    segments = 0
    for ann in pred["annotations"]:
        png = inference / "predictions" / ann["file_name"]
        ids = rgb2id(np.asarray(Image.open(png).convert("RGB")))
        assert ids.shape == sizes[ann["image_id"]], png
        listed = [s["id"] for s in ann["segments_info"]]
        assert len(set(listed)) == len(listed) and set(np.unique(ids).tolist()) - {0} == set(listed), png
        assert {s["category_id"] for s in ann["segments_info"]} <= panoptic_ids
        segments += len(listed)
    assert segments > 0

    # instances: COCO results with dataset category ids and RLE masks at the image size
    instance_gt = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    thing_ids = {c["id"] for c in instance_gt["categories"]}
    results = json.loads((inference / "coco_instances_results.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(images)
    for r in results:
        assert r["category_id"] in thing_ids and 0 <= r["score"] <= 1, r
        _rle_masks([r], sizes[r["image_id"]])

    # semantic: per image, one RLE per predicted class; together they cover each pixel once
    sem = json.loads((inference / "sem_seg_predictions.json").read_text())
    by_file = {}
    for entry in sem:
        by_file.setdefault(entry["file_name"], []).append(entry)
    assert sorted(by_file) == sorted(str(coco / "val2017" / im["file_name"]) for im in images.values())
    for image in images.values():
        entries = by_file[str(coco / "val2017" / image["file_name"])]
        assert {e["category_id"] for e in entries} <= panoptic_ids
        cover = _rle_masks(entries, sizes[image["id"]]).sum(0)
        assert (cover == 1).all(), image["file_name"]


@pytest.mark.slow
def test_eval_only_with_tta_equals_direct_evaluation(eval_dir, parity_dir, tmp_path):
    from mask2former.data.build import build_detection_test_loader
    from mask2former.data.datasets.builtin import register_all_builtin
    from mask2former.evaluation import build_evaluators, inference_on_dataset
    from mask2former.modeling.test_time_augmentation import build_tta_model

    out = tmp_path / "out"
    results = run_eval_only(eval_dir, parity_dir, out, *TTA_OPTS)
    tasks = ["panoptic_seg", "segm", "sem_seg"]
    assert sorted(results) == sorted(tasks + [t + "_TTA" for t in tasks])
    assert (out / "inference_TTA" / "predictions.json").is_file()
    assert (out / "inference_TTA" / "coco_instances_results.json").is_file()
    assert (out / "inference" / "predictions.json").is_file()
    # the TTA model really ran: its numbers are not the plain ones
    assert any(results[t] != results[t + "_TTA"] for t in tasks)

    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / "tiny_panoptic.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", *TTA_OPTS])
    name = "e2e_tta_" + DATASET
    register_all_builtin(str(eval_dir / "datasets"), prefix="e2e_tta_", names=[DATASET])
    model = m2f.build_model(cfg).eval()
    m2f.load_checkpoint(model, str(parity_dir / "tiny_panoptic.pkl"))
    tta = build_tta_model(cfg, model)
    direct = inference_on_dataset(tta, build_detection_test_loader(cfg, name),
                                  build_evaluators(cfg, name, str(tmp_path / "direct")))
    assert sorted(direct) == sorted(tasks)
    bad = {t: metric_differences(results[t + "_TTA"], direct[t]) for t in tasks}
    assert not any(bad.values()), f"--eval-only TTA results differ from a direct evaluation: {bad}"
