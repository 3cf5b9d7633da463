"""The demo library (mask2former.demo), by import and without a model: input expansion, the COCO /
PNG exporters (and their atomic writes), and the image and video loops driven by a stand-in
predictor. The command line and the real models are tested in tests/test_demo.py."""
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

import mask2former.demo as demo_lib
import mask2former.engine
import mask2former.engine.predictor
from mask2former.data.ids import rgb2id
from mask2former.structures import Instances
from mask2former.utils.visualizer import Visualizer

# dataset ids: things 10 (a), 20 (b); stuff 30 (c). Contiguous: a 0, b 1, c 2.
META = {"name": "demo_lib_test", "stuff_classes": ["a", "b", "c"], "thing_classes": ["a", "b"],
        "thing_dataset_id_to_contiguous_id": {10: 0, 20: 1},
        "stuff_dataset_id_to_contiguous_id": {10: 0, 20: 1, 30: 2}}


def test_predictor_keeps_its_engine_import_paths():
    assert mask2former.engine.Predictor is mask2former.engine.predictor.Predictor is demo_lib.Predictor
    assert mask2former.engine.predictor.resize_shortest_edge(480, 640, 800, 1333) == (800, 1067)


def test_expand_inputs_folders_globs_and_duplicates(tmp_path, caplog):
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is not an input
    (tmp_path / "empty").mkdir()
    a, b = str(tmp_path / "a.JPG"), str(tmp_path / "b.png")
    caplog.set_level(logging.WARNING)
    got = demo_lib.expand_inputs([str(tmp_path), str(tmp_path / "*.png"), b, str(tmp_path / "missing.png"),
                                  str(tmp_path / "empty"), str(tmp_path / "none*.jpg")])
    assert got == [a, b, str(tmp_path / "missing.png")]
    assert "no image file" in caplog.text and "no file matches" in caplog.text
    assert demo_lib.is_image_file_name("x/y.jpeg") and not demo_lib.is_image_file_name(str(tmp_path / "sub.png"))


def _predictions(h=6, w=8):
    seg = torch.zeros(h, w, dtype=torch.int32)
    seg[:, :3] = 1   # thing b (contiguous 1)
    seg[4:, 5:] = 2  # stuff c (contiguous 2)
    segments = [{"id": 1, "category_id": 1, "isthing": True}, {"id": 2, "category_id": 2, "isthing": False}]
    masks = torch.zeros(2, h, w)
    masks[0, 1:3, 1:4] = 1
    masks[1, 3:, :] = 1
    instances = Instances((h, w), pred_masks=masks, scores=torch.tensor([0.9, 0.4]),
                          pred_classes=torch.tensor([0, 1]))
    sem = torch.zeros(3, h, w)
    sem[2] = 1
    sem[0, :2] = 2
    return {"panoptic_seg": (seg, segments), "instances": instances, "sem_seg": sem}


def test_prediction_exporter_writes_the_coco_formats(tmp_path):
    exporter = demo_lib.PredictionExporter(str(tmp_path), META, num_classes=3)
    preds = _predictions()
    written = exporter.add("img", preds)
    assert written == [str(tmp_path / "panoptic" / "img.png"), str(tmp_path / "sem_seg" / "img.png")]
    assert exporter.close() == [str(tmp_path / "panoptic.json"), str(tmp_path / "instances.json")]

    png = cv2.imread(str(tmp_path / "panoptic" / "img.png"))[:, :, ::-1]
    assert np.array_equal(rgb2id(png), preds["panoptic_seg"][0].numpy())
    pan = json.loads((tmp_path / "panoptic.json").read_text())
    assert pan["annotations"] == [{"image_id": "img", "file_name": "img.png", "segments_info": [
        {"id": 1, "category_id": 20, "isthing": True, "area": 18, "bbox": [0, 0, 3, 6], "iscrowd": 0},
        {"id": 2, "category_id": 30, "isthing": False, "area": 6, "bbox": [5, 4, 3, 2], "iscrowd": 0}]}]
    assert pan["categories"] == [{"id": 10, "name": "a", "isthing": 1}, {"id": 20, "name": "b", "isthing": 1},
                                 {"id": 30, "name": "c", "isthing": 0}]
    inst = json.loads((tmp_path / "instances.json").read_text())
    assert [(r["image_id"], r["category_id"]) for r in inst] == [("img", 10), ("img", 20)]
    assert inst[0]["bbox"] == [1.0, 1.0, 3.0, 2.0]
    assert np.array_equal(mask_util.decode(inst[1]["segmentation"]), preds["instances"].pred_masks[1].numpy())
    labels = cv2.imread(str(tmp_path / "sem_seg" / "img.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint8 and np.array_equal(labels, preds["sem_seg"].argmax(0).numpy())

    # one task only; more than 256 classes give 16-bit label PNGs
    only = demo_lib.PredictionExporter(str(tmp_path / "only"), META, num_classes=300)
    assert only.add("x", preds, "semantic") == [str(tmp_path / "only" / "sem_seg" / "x.png")]
    assert cv2.imread(str(tmp_path / "only" / "sem_seg" / "x.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert only.close() == []


def test_dataset_category_ids_fall_back_with_one_warning(caplog):
    ids = demo_lib.DatasetCategoryIds(META)
    assert (ids(0, True), ids(2, False), ids(1, False)) == (10, 30, 20)
    with caplog.at_level(logging.WARNING):
        assert ids(7, True) == 7 and ids(7, False) == 7
    assert caplog.text.count("class 7 is in neither") == 1 and "demo_lib_test" in caplog.text
    assert demo_lib.DatasetCategoryIds({})(5, True) == 5  # no tables: the model's ids are the dataset's


def test_exporters_never_leave_a_partial_file(tmp_path, monkeypatch):
    exporter = demo_lib.PredictionExporter(str(tmp_path), META, num_classes=3)
    exporter.add("img", _predictions())
    (tmp_path / "panoptic.json").write_text("old")

    def interrupted(src, dst):
        raise OSError("interrupted")
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        exporter.close()
    with pytest.raises(OSError, match="interrupted"):
        exporter.add("img2", _predictions())
    monkeypatch.undo()
    assert (tmp_path / "panoptic.json").read_text() == "old"
    assert not (tmp_path / "instances.json").exists() and not (tmp_path / "panoptic" / "img2.png").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


class _StandInPredictor:
    """predict_batch -> sem_seg scores: class 0 on the left half, class 2 on the right half."""

    def __init__(self):
        self.metadata = META
        self.cfg = SimpleNamespace(MODEL=SimpleNamespace(SEM_SEG_HEAD=SimpleNamespace(NUM_CLASSES=3)))
        self.batches = []

    def predict_batch(self, images, input_format="BGR"):
        assert input_format == "BGR"
        self.batches.append(len(images))
        outputs = []
        for image in images:
            h, w = image.shape[:2]
            scores = torch.zeros(3, h, w)
            scores[0, :, : w // 2] = 1
            scores[2, :, w // 2:] = 1
            outputs.append({"sem_seg": scores})
        return outputs


def test_run_images_by_import(tmp_path, caplog):
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(10, 12), (8, 8), (9, 14)]):
        cv2.imwrite(str(src / f"im{i}.png"), np.full((h, w, 3), 40 * i, np.uint8))
    (src / "broken.png").write_bytes(b"not an image")
    predictor, out = _StandInPredictor(), tmp_path / "out"
    caplog.set_level(logging.INFO)
    rc = demo_lib.run_images(predictor, Visualizer(META, num_classes=3), [str(src)], str(out), batch_size=2,
                             save_json=True)
    assert rc == 0 and predictor.batches == [2, 1]
    assert cv2.imread(str(out / "im2.png")).shape == (9, 14, 3)
    labels = cv2.imread(str(out / "sem_seg" / "im0.png"), cv2.IMREAD_UNCHANGED)
    assert (labels[:, :6] == 0).all() and (labels[:, 6:] == 2).all()
    assert "3 of 4 images processed; skipped 1" in caplog.text
    assert demo_lib.run_images(predictor, Visualizer(None), [str(src / "broken.png")], str(tmp_path / "o")) == 1


def test_run_video_by_import(tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (16, 8))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((8, 16, 3), 30 * i, np.uint8))
    writer.release()
    predictor = _StandInPredictor()
    rc = demo_lib.run_video(predictor, Visualizer(META, num_classes=3), demo_lib.open_video(video), video,
                            str(tmp_path / "vis"), batch_size=4)
    assert rc == 0 and predictor.batches == [4, 2]
    capture = demo_lib.open_video(str(tmp_path / "vis" / "clip.mp4"))
    assert len(list(demo_lib.read_frames(capture))) == 6
    capture.release()
    # writing over the input is refused
    assert demo_lib.run_video(predictor, Visualizer(None), demo_lib.open_video(video), video, video) == 1
    with pytest.raises(OSError, match="video file not found"):
        demo_lib.open_video(str(Path(tmp_path) / "missing.mp4"))


def test_file_writers_convert_numpy_and_name_the_file(tmp_path):
    from mask2former.evaluation.files import write_image, write_json

    path = write_json(str(tmp_path / "a" / "x.json"), {"n": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True)})
    assert json.loads(Path(path).read_text()) == {"n": 3, "f": 0.5, "b": True}
    with pytest.raises(TypeError, match="object"):
        write_json(str(tmp_path / "y.json"), {"bad": object()})
    assert not (tmp_path / "y.json").exists()
    with pytest.raises(OSError, match=r"could not write .*z\.nosuchformat"):
        write_image(str(tmp_path / "z.nosuchformat"), np.zeros((2, 2, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
