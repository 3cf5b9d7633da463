"""Predictor (test-time resizing), Visualizer, the demo library (mask2former.demo: inputs, video,
exporters) and the demo/demo.py command line (end to end)."""
import importlib.util
import json
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import mask2former as m2f
from mask2former import demo as demo_lib
from mask2former.data import MetadataCatalog
from mask2former.data.image_io import read_image_8bit
from mask2former.engine import Predictor, resize_shortest_edge
from mask2former.structures import Instances
from mask2former.utils.visualizer import Visualizer, default_color
from tests.conftest import PARITY, REPO, require_shared

# Small test sizes keep the tiny models fast on CPU.
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


def _tiny_cfg(name="panoptic", opts=()):
    yaml = require_shared(PARITY / f"tiny_{name}.yaml")
    pkl = require_shared(PARITY / f"tiny_{name}.pkl")
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(yaml))
    cfg.merge_from_list(["MODEL.WEIGHTS", str(pkl), "MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(scope="module")
def demo():
    """The command line, demo/demo.py (its functions are in mask2former.demo)."""
    spec = importlib.util.spec_from_file_location("mask2former_demo_cli", REPO / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 90, np.uint8)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 4, (30, 200, 240), -1)
    cv2.rectangle(img, (w // 2, h // 4), (w - 3, h - 3), (200, 40, 60), -1)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- resize_shortest_edge
@pytest.mark.parametrize("h, w, short, max_size, expected", [
    (480, 640, 800, 1333, (800, 1067)),    # 1066.67 rounds up
    (640, 480, 800, 1333, (1067, 800)),    # portrait
    (100, 100, 50, 1000, (50, 50)),        # square, shrinking
    (1000, 3000, 800, 1333, (444, 1333)),  # long side capped: 800x2400 -> 444.33x1333
    (500, 1000, 600, 1200, (600, 1200)),   # long side exactly at the cap is kept
    (2, 3, 3, 100, (3, 5)),                # 4.5 rounds half up (int(x + 0.5)), not to even
    (213, 320, 800, 1333, (800, 1202)),    # 1201.88
    (75, 109, 75, 1333, (75, 109)),        # already the right size
    (75, 109, 0, 1333, (75, 109)),         # short side 0: no resizing
])
def test_resize_shortest_edge(h, w, short, max_size, expected):
    assert resize_shortest_edge(h, w, short, max_size) == expected


def test_resize_shortest_edge_rejects_empty_image():
    with pytest.raises(ValueError):
        resize_shortest_edge(0, 10, 800, 1333)


# ----------------------------------------------------------------------------- Predictor
def test_predictor_outputs_at_original_size():
    predictor = Predictor(_tiny_cfg("panoptic", SMALL))
    assert not predictor.model.training
    image = _image(50, 70)
    inputs = predictor.preprocess(image, "BGR")
    assert tuple(inputs["image"].shape) == (3, 64, 90)  # 70 * 64 / 50 = 89.6
    assert (inputs["height"], inputs["width"]) == (50, 70)
    # Channel order is converted to INPUT.FORMAT (RGB here) whatever the input's order.
    assert torch.equal(inputs["image"], predictor.preprocess(image[:, :, ::-1].copy(), "RGB")["image"])

    out = predictor(image)
    assert tuple(out["sem_seg"].shape) == (133, 50, 70)
    seg, info = out["panoptic_seg"]
    assert tuple(seg.shape) == (50, 70)
    assert set(np.unique(seg.cpu().numpy())) <= {0} | {s["id"] for s in info}
    assert tuple(out["instances"].pred_masks.shape[1:]) == (50, 70)


def test_predictor_matches_official_outputs_without_resizing():
    io = np.load(require_shared(PARITY / "tiny_semantic_io.npz"))
    image = io["random_native__image"]  # RGB, 75 x 109; MIN_SIZE_TEST 75 means no resizing
    predictor = Predictor(_tiny_cfg("semantic", ["INPUT.MIN_SIZE_TEST", "75", "INPUT.MAX_SIZE_TEST", "1333"]))
    expected = io["random_native__sem_argmax"]
    for img, fmt in ((image, "RGB"), (image[:, :, ::-1], "BGR")):
        got = predictor(img, input_format=fmt)["sem_seg"].argmax(0).cpu().numpy()
        assert got.shape == expected.shape
        assert (got == expected).mean() >= 0.999


def test_predictor_missing_weights_is_a_clear_error(tmp_path):
    cfg = _tiny_cfg("panoptic")
    missing = tmp_path / "nope" / "model_final.pkl"
    cfg.merge_from_list(["MODEL.WEIGHTS", str(missing)])
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS") as err:
        Predictor(cfg)
    assert str(missing) in str(err.value)


def test_predictor_rejects_bad_images():
    predictor = Predictor(_tiny_cfg("panoptic", SMALL))
    with pytest.raises(ValueError):
        predictor(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError):
        predictor(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError):
        predictor(np.zeros((10, 10, 3), np.uint8), input_format="YUV")


# ----------------------------------------------------------------------------- Visualizer
def test_visualizer_without_metadata_and_thresholds():
    image = np.full((20, 30, 3), 100, np.uint8)
    vis = Visualizer(None, confidence_threshold=0.5)
    assert vis.class_name(7) == "class 7"
    assert vis.class_color(7) == default_color(7) == default_color(7)
    assert default_color(1) != default_color(2)

    masks = torch.zeros(2, 20, 30)
    masks[0, 2:10, 2:12] = 1
    masks[1, 12:18, 15:28] = 1
    inst = Instances((20, 30), pred_masks=masks, scores=torch.tensor([0.9, 0.2]),
                     pred_classes=torch.tensor([3, 4]))
    out = vis.draw_instances(image, inst)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 100).all()  # input untouched
    assert not np.array_equal(out[5, 6], image[5, 6])  # confident instance drawn
    assert np.array_equal(out[15, 20], image[15, 20])  # low-score instance not drawn

    big = np.full((60, 90, 3), 100, np.uint8)
    seg = torch.zeros(60, 90, dtype=torch.int32)
    seg[:, 45:] = 1
    pan = vis.draw_panoptic_seg(big, seg, [{"id": 1, "category_id": 2, "isthing": False}])
    assert np.array_equal(pan[50, 5], big[50, 5]) and not np.array_equal(pan[50, 80], big[50, 80])

    sem = torch.zeros(5, 20, 30)
    sem[1] = 1.0
    assert not np.array_equal(vis.draw_predictions(image, {"sem_seg": sem}), image)


def test_visualizer_class_table_follows_num_classes():
    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    vis = Visualizer(meta, num_classes=133)
    assert vis.class_name(0) == meta.stuff_classes[0]
    assert vis.class_name(132) == meta.stuff_classes[132]
    assert vis.class_color(100) == tuple(meta.stuff_colors[100])
    inst_meta = {"thing_classes": ["a", "b"], "stuff_classes": ["a", "x", "b"]}
    assert Visualizer(inst_meta, num_classes=2).class_name(1) == "b"
    assert Visualizer(inst_meta, num_classes=3).class_name(1) == "x"


# ----------------------------------------------------------------------------- demo: images
# Tiny inputs keep each model call short: images are resized to a 32-pixel short side.
TINY = ["INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "64"]


def _demo_args(name, *args, opts=()):
    yaml, pkl = require_shared(PARITY / f"tiny_{name}.yaml"), require_shared(PARITY / f"tiny_{name}.pkl")
    return ["--config-file", str(yaml), *args, "--opts", "MODEL.WEIGHTS", str(pkl), "MODEL.DEVICE", "cpu",
            *TINY, *opts]


@pytest.fixture(scope="module")
def tiny_predictors():
    """One Predictor per tiny model (plain inference at the TINY test size), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Predictor(_tiny_cfg(name, TINY))
        return cache[name]
    return get


def _write_inputs(folder: Path) -> dict:
    """Images in assorted formats (plus one corrupt file); returns name -> expected (H, W)."""
    from PIL import Image

    folder.mkdir()
    cv2.imwrite(str(folder / "color.png"), _image(30, 44, 1))
    gray16 = (np.linspace(0, 65535, 28 * 36).reshape(28, 36)).astype(np.uint16)
    cv2.imwrite(str(folder / "gray16.png"), gray16)
    Image.fromarray(np.dstack([_image(26, 40, 2)[:, :, ::-1], np.full((26, 40), 128, np.uint8)]),
                    "RGBA").save(folder / "rgba.png")
    Image.fromarray(_image(33, 35, 3)[:, :, 0], "L").save(folder / "gray.jpg")
    rotated = Image.fromarray(_image(24, 40, 4)[:, :, ::-1])
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif.jpg", exif=exif)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return {"color": (30, 44), "gray16": (28, 36), "rgba": (26, 40), "gray": (33, 35), "exif": (40, 24)}


def test_read_image_formats(tmp_path):
    sizes = _write_inputs(tmp_path / "in")
    src = tmp_path / "in"
    for name, ext in (("color", "png"), ("gray16", "png"), ("rgba", "png"), ("gray", "jpg"), ("exif", "jpg")):
        image = read_image_8bit(str(src / f"{name}.{ext}"), "BGR")
        assert image.shape == (*sizes[name], 3) and image.dtype == np.uint8, name
    assert np.array_equal(read_image_8bit(str(src / "color.png"), "BGR"), _image(30, 44, 1))
    g16 = read_image_8bit(str(src / "gray16.png"), "BGR")  # 16 bits scaled to 8, not clipped
    assert g16[0, 0, 0] == 0 and g16[-1, -1, 0] == 255 and 120 <= g16[14, 18, 0] <= 135
    assert (g16[..., 0] == g16[..., 2]).all()
    assert np.array_equal(read_image_8bit(str(src / "rgba.png"), "BGR"), _image(26, 40, 2))  # alpha dropped
    with pytest.raises(OSError, match="broken.png"):
        read_image_8bit(str(src / "broken.png"), "BGR")
    with pytest.raises(OSError, match="missing.png"):
        read_image_8bit(str(src / "missing.png"), "BGR")


def test_demo_images_one_visualisation_per_readable_image(demo, tmp_path, caplog):
    sizes = _write_inputs(tmp_path / "in")
    out_dir = tmp_path / "out"
    caplog.set_level(logging.INFO)
    # a folder, a glob and a plain path (the folder already lists color.png: no duplicate)
    rc = demo.main(_demo_args("panoptic", "--input", str(tmp_path / "in"), str(tmp_path / "in" / "*.png"),
                              str(tmp_path / "in" / "color.png"), "--output", str(out_dir), "--batch-size", "3",
                              "--confidence-threshold", "0.3"))
    assert rc == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{n}.png" for n in sizes)
    for name, hw in sizes.items():
        assert cv2.imread(str(out_dir / f"{name}.png")).shape == (*hw, 3), name
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken.png" in m and r.levelno >= logging.ERROR for m, r in zip(messages, caplog.records))
    assert any("5 of 6 images processed; skipped 1" in m for m in messages)


def test_demo_cli_fails_when_nothing_succeeds(demo, tmp_path, caplog):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    caplog.set_level(logging.INFO)
    args = _demo_args("panoptic", "--input", str(bad), str(tmp_path / "missing.png"),
                      "--output", str(tmp_path / "out"))
    assert demo.main(args) == 1
    assert not (tmp_path / "out").exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "bad.jpg" in messages and "missing.png" in messages and "0 of 2 images" in messages


def test_demo_cli_missing_weights(demo, tmp_path, caplog):
    yaml = require_shared(PARITY / "tiny_panoptic.yaml")
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _image(20, 20))
    args = ["--config-file", str(yaml), "--input", str(img), "--output", str(tmp_path / "out"),
            "--opts", "MODEL.WEIGHTS", str(tmp_path / "missing.pkl")]
    assert demo.main(args) == 1
    assert any("MODEL.WEIGHTS" in r.getMessage() for r in caplog.records)


def test_demo_output_paths_and_argument_errors(demo, tmp_path, capsys, monkeypatch):
    assert demo_lib.output_paths(str(tmp_path / "vis.png"), ["x/a.jpg"]) == [str(tmp_path / "vis.png")]
    assert demo_lib.output_paths("out", ["x/a.jpg", "y/a.png", "b.jpeg"]) == [
        str(Path("out") / "a.png"), str(Path("out") / "a_1.png"), str(Path("out") / "b.png")]
    assert demo_lib.video_output_path("vis", "clips/a.avi") == str(Path("vis") / "a.mp4")
    assert demo_lib.video_output_path("vis/out.mp4", "clips/a.avi") == "vis/out.mp4"
    parsed = demo.get_parser().parse_args(["--input", "a.jpg"])
    assert parsed.confidence_threshold == 0.5 and parsed.batch_size == 1 and not parsed.save_json
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    out = str(tmp_path / "out")
    for argv, message in [
        (["--input", a, b, "--output", str(tmp_path / "vis.png")], "names one image file"),
        (["--output", out], "exactly one of --input, --video-input and --webcam"),
        (["--input", a, "--video-input", "v.mp4", "--output", out], "got --input, --video-input"),
        (["--input", a, "--output", out, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--input", a, "--output", out, "--confidence-threshold", "1.5"], "must lie in [0, 1]"),
        (["--video-input", "v.mp4", "--output", out, "--save-json"], "--input images only"),
        (["--input", a, "--save-json"], "--save-json needs --output"),
        (["--input", a, "--task", "depth", "--output", out], "invalid choice: 'depth'"),
    ]:
        with pytest.raises(SystemExit) as exc:
            demo.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    # headless (simulated, so that the check runs on machines with a display too): showing in a
    # window is refused up front, with the reason
    monkeypatch.setattr(demo, "display_available", lambda: False)
    monkeypatch.setattr(demo, "no_display_reason", lambda: "simulated: DISPLAY is not set")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--input", a])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no --output given and no display to show the results in (simulated: DISPLAY is not set)" in err


# ----------------------------------------------------------------------------- demo: --save-json
def test_demo_save_json_matches_model_outputs(demo, tiny_predictors, tmp_path):
    from pycocotools import mask as mask_util

    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "one.png"), _image(30, 40, 5))
    cv2.imwrite(str(src / "two.png"), _image(36, 30, 6))
    out = tmp_path / "out"
    assert demo.main(_demo_args("panoptic", "--input", str(src), "--output", str(out), "--save-json",
                                "--batch-size", "2")) == 0
    predictor = tiny_predictors("panoptic")
    meta = predictor.metadata
    thing_c2d = {c: d for d, c in meta.thing_dataset_id_to_contiguous_id.items()}
    stuff_c2d = {c: d for d, c in meta.stuff_dataset_id_to_contiguous_id.items()}
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert {c["id"] for c in panoptic["categories"]} == set(stuff_c2d.values())
    instances = json.loads((out / "instances.json").read_text())
    for name in ("one", "two"):
        expected = predictor(read_image_8bit(str(src / f"{name}.png"), "BGR"))
        # panoptic: the PNG holds the segment ids; segments_info has the dataset category ids
        seg, infos = expected["panoptic_seg"]
        png = cv2.imread(str(out / "panoptic" / f"{name}.png"))[:, :, ::-1].astype(np.int64)
        assert np.array_equal(png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2], seg.numpy())
        (ann,) = [a for a in panoptic["annotations"] if a["image_id"] == name]
        assert ann["file_name"] == f"{name}.png"
        assert [(s["id"], s["category_id"], s["isthing"]) for s in ann["segments_info"]] == [
            (s["id"], (thing_c2d if s["isthing"] else stuff_c2d)[s["category_id"]], s["isthing"]) for s in infos]
        assert [s["area"] for s in ann["segments_info"]] == [int((seg == s["id"]).sum()) for s in infos]
        # instances: RLE masks, scores and dataset category ids of every predicted instance
        got = [r for r in instances if r["image_id"] == name]
        inst = expected["instances"]
        assert len(got) == len(inst) > 0
        for r, mask, score, cls in zip(got, inst.pred_masks, inst.scores, inst.pred_classes):
            assert np.array_equal(mask_util.decode(r["segmentation"]), mask.numpy().astype(np.uint8))
            assert r["score"] == pytest.approx(float(score), abs=1e-6)
            assert r["category_id"] == thing_c2d[int(cls)]
        # semantic: a label PNG of the argmax class
        labels = cv2.imread(str(out / "sem_seg" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(labels, expected["sem_seg"].argmax(0).numpy())


def test_demo_task_and_custom_datasets(demo, tmp_path):
    """--datasets registers a YAML dataset whose colours and category ids the demo then uses;
    --task picks the one output drawn and saved."""
    from mask2former.data.datasets.custom import unregister

    name = "demo_test_custom_pan"
    cats = [{"id": 1000 + i, "name": f"c{i}", "isthing": int(i < 80), "color": [0, 255, 0]} for i in range(133)]
    yaml_path = tmp_path / "datasets.yaml"
    yaml_path.write_text(json.dumps({"datasets": [{
        "name": name, "type": "coco_panoptic", "image_root": "im", "panoptic_root": "pan",
        "panoptic_json": "pan.json", "categories": cats}]}))
    src = tmp_path / "in.png"
    cv2.imwrite(str(src), np.full((30, 40, 3), 100, np.uint8))
    try:
        rc = demo.main(_demo_args("panoptic", "--input", str(src), "--output", str(tmp_path / "out"),
                                  "--save-json", "--task", "panoptic", "--datasets", str(yaml_path),
                                  opts=["DATASETS.TEST", f"('{name}',)", "MODEL.MASK_FORMER.TEST.INSTANCE_ON",
                                        "False"]))
    finally:
        unregister([name])
    assert rc == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["in.png", "panoptic", "panoptic.json"]
    ann = json.loads((out / "panoptic.json").read_text())["annotations"][0]
    assert ann["segments_info"] and all(s["category_id"] >= 1000 for s in ann["segments_info"])
    vis = cv2.imread(str(out / "in.png"))
    drawn = cv2.imread(str(out / "panoptic" / "in.png")).any(axis=2)
    # half grey (100), half the dataset's green (things get a small jitter): green dominates
    blue, green, red = (np.median(vis[drawn][:, c]) for c in range(3))
    assert green > 140 and red < 100 and blue < 100


def test_demo_unregistrable_datasets_yaml(demo, tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  - name: x\n    type: nonsense\n")
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _image(20, 20))
    assert demo.main(_demo_args("panoptic", "--input", str(img), "--output", str(tmp_path / "o"),
                                "--datasets", str(bad))) == 1
    assert any("--datasets" in r.getMessage() and "bad.yaml" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- demo: video
def _write_video(path: Path, frames: int, size=(48, 32), fps=10.0) -> Path:
    """Frames that differ from one to the next (background colour, a moving circle and bar), so
    that the model's predictions, and what is drawn, differ too."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    w, h = size
    for i in range(frames):
        frame = np.empty((h, w, 3), np.uint8)
        frame[:] = ((37 * i) % 200 + 30, (91 * i) % 200 + 30, (53 * i) % 200 + 30)
        cv2.circle(frame, ((7 * i) % w, h // 2), h // 3, (30, 200, 240), -1)
        cv2.rectangle(frame, (w // 2, (5 * i) % (h // 2)), (w - 3, h - 3), (200, 40, (60 + 10 * i) % 256), -1)
        writer.write(frame)
    writer.release()
    return path


def _decode(path: Path) -> list:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _count_frames(path: Path):
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    meta = (int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    decoded = 0
    while cap.read()[0]:
        decoded += 1
    cap.release()
    return decoded, meta


def test_demo_video_writes_every_frame(demo, tmp_path, caplog):
    video = _write_video(tmp_path / "clip.mp4", 30)
    caplog.set_level(logging.INFO)
    # 30 frames in batches of 8: the last batch is partial
    rc = demo.main(_demo_args("semantic", "--video-input", str(video), "--output", str(tmp_path / "vis"),
                              "--batch-size", "8"))
    assert rc == 0
    decoded, (count, width, height) = _count_frames(tmp_path / "vis" / "clip.mp4")
    assert decoded == count == 30 and (width, height) == (48, 32)
    assert any("30 frames" in r.getMessage() and "frames/s" in r.getMessage() for r in caplog.records)

    # What is drawn on each frame is the image path's drawing of that frame: the frames the
    # video path decoded, saved losslessly, go through --input; its outputs, encoded by the same
    # writer at the same rate, decode to the video path's frames (the codec is deterministic,
    # so its loss is the same on both sides).
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(_decode(video)):
        cv2.imwrite(str(frames_dir / f"{i:03d}.png"), frame)
    assert demo.main(_demo_args("semantic", "--input", str(frames_dir), "--output", str(tmp_path / "img"),
                                "--batch-size", "8")) == 0
    drawn = [cv2.imread(str(tmp_path / "img" / f"{i:03d}.png")) for i in range(30)]
    writer = demo_lib.open_video_writer(str(tmp_path / "expected.mp4"), 10.0, (48, 32))
    for image in drawn:
        writer.write(image)
    writer.release()
    got, expected = _decode(tmp_path / "vis" / "clip.mp4"), _decode(tmp_path / "expected.mp4")
    assert len(got) == len(expected) == 30
    for i, (a, b) in enumerate(zip(got, expected)):
        assert np.array_equal(a, b), f"frame {i}: {np.abs(a.astype(int) - b).mean():.2f} mean difference"


def test_demo_webcam_mode(demo, tmp_path, monkeypatch):
    video = _write_video(tmp_path / "cam.mp4", 5)
    real_capture = cv2.VideoCapture
    opened = []

    def fake_capture(source, *args):
        opened.append(source)
        return real_capture(str(video) if source == 0 else source, *args)
    monkeypatch.setattr(cv2, "VideoCapture", fake_capture)
    out = tmp_path / "webcam.mp4"
    assert demo.main(_demo_args("semantic", "--webcam", "--output", str(out), "--batch-size", "2")) == 0
    assert opened == [0] and _count_frames(out)[0] == 5


def test_demo_bad_videos(demo, tmp_path, caplog):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video")
    caplog.set_level(logging.INFO)
    for path, message in ((not_video, "cannot open video"), (tmp_path / "missing.mp4", "video file not found")):
        assert demo.main(_demo_args("semantic", "--video-input", str(path), "--output", str(tmp_path / "o"))) == 1
        assert any(message in r.getMessage() and path.name in r.getMessage() for r in caplog.records)
        # rejected before the model is built
        assert not any("Loaded" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "o").exists()


def test_open_video_writer_codec_fallback(tmp_path):
    path = tmp_path / "v.mp4"
    writer = demo_lib.open_video_writer(str(path), 5.0, (16, 8), codecs=("zzzz", "mp4v"))
    for _ in range(3):
        writer.write(np.zeros((8, 16, 3), np.uint8))
    writer.release()
    assert _count_frames(path)[0] == 3
    with pytest.raises(RuntimeError, match=r"cannot write video .*w\.mp4.*zzzz, yyyy"):
        demo_lib.open_video_writer(str(tmp_path / "w.mp4"), 5.0, (16, 8), codecs=("zzzz", "yyyy"))


@pytest.mark.parametrize("works", ["avc1", "x264", "mp4v"])
def test_open_video_writer_tries_avc1_x264_mp4v_in_turn(tmp_path, monkeypatch, works):
    """README: "Videos are written as mp4 with the first codec that works among avc1, x264 and
    mp4v". A fake cv2.VideoWriter that opens only with ``works`` records the codecs tried."""
    tried = []

    class FakeWriter:
        def __init__(self, path, fourcc, fps, size):
            tried.append(fourcc)
            self.opened = fourcc == cv2.VideoWriter_fourcc(*works)

        def isOpened(self):
            return self.opened

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", FakeWriter)
    writer = demo_lib.open_video_writer(str(tmp_path / "v.mp4"), 5.0, (16, 8))
    assert isinstance(writer, FakeWriter) and writer.isOpened()
    order = ["avc1", "x264", "mp4v"]
    assert demo_lib.VIDEO_CODECS == tuple(order)
    assert tried == [cv2.VideoWriter_fourcc(*c) for c in order[: order.index(works) + 1]]


def test_progress_without_tqdm_logs_frames_per_second(caplog):
    caplog.set_level(logging.INFO)
    progress = demo_lib.Progress(total=10, desc="clip", every_s=0.0, use_tqdm=False)
    progress.update(4)
    progress.close()
    assert any(re.search(r"clip: 4/10 frames, [\d.]+ frames/s", r.getMessage()) for r in caplog.records)


def test_batched_helper_streams():
    consumed = []

    def items():
        for i in range(7):
            consumed.append(i)
            yield i
    gen = demo_lib.batched(items(), 3)
    assert next(gen) == [0, 1, 2] and consumed == [0, 1, 2]  # nothing read ahead
    assert list(gen) == [[3, 4, 5], [6]]


# ----------------------------------------------------------------------------- batching and TTA
def _assert_same_outputs(a: dict, b: dict, exact: bool = True):
    assert sorted(a) == sorted(b)
    if "sem_seg" in a:
        if exact:
            assert torch.equal(a["sem_seg"], b["sem_seg"])
        else:
            torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=1e-4, atol=1e-5)
    if "panoptic_seg" in a:
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    if "instances" in a:
        ia, ib = a["instances"], b["instances"]
        assert torch.equal(ia.pred_classes, ib.pred_classes) and torch.equal(ia.pred_masks, ib.pred_masks)
        if exact:
            assert torch.equal(ia.scores, ib.scores)
        else:
            torch.testing.assert_close(ia.scores, ib.scores, rtol=1e-4, atol=1e-5)


def test_predict_batch_equals_per_image(tiny_predictors):
    predictor = tiny_predictors("panoptic")
    images = [_image(32, 44, 7), _image(32, 44, 8), _image(40, 30, 9)]  # two sizes: two groups
    batched = predictor.predict_batch(images)
    assert len(batched) == 3 and predictor.predict_batch([]) == []
    for image, got in zip(images, batched):
        _assert_same_outputs(got, predictor(image), exact=False)


def _tta_predictor(name, min_sizes, flip, max_size=64):
    return Predictor(_tiny_cfg(name, TINY + ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", str(tuple(min_sizes)),
                                             "TEST.AUG.MAX_SIZE", str(max_size), "TEST.AUG.FLIP", str(flip)]))


@pytest.mark.parametrize("name", ["panoptic", "instance", "semantic"])
def test_tta_single_view_equals_plain_inference(name, tiny_predictors):
    image = _image(30, 40, 10)
    plain = tiny_predictors(name)(image)
    # the only scale is the plain test size and no flip: exactly plain inference
    _assert_same_outputs(_tta_predictor(name, [32], False)(image), plain)


@pytest.mark.parametrize("name", ["panoptic", "instance", "semantic"])
def test_tta_multi_scale_and_flip(name, tiny_predictors):
    from mask2former.modeling.test_time_augmentation import MaskFormerWithTTA

    predictor = _tta_predictor(name, [16, 24], True)
    assert isinstance(predictor.tta, MaskFormerWithTTA)
    image = _image(30, 40, 11)
    out = predictor(image)
    mirrored = predictor(np.ascontiguousarray(image[:, ::-1]))
    if name == "semantic":
        # the official definition: the mean over the views of the model's own semantic output
        views = predictor.tta.views(torch.as_tensor(image[:, :, ::-1].transpose(2, 0, 1).copy()), 30, 40)
        assert [(tuple(v.shape[-2:]), f) for v, f in views] == [((16, 21), False), ((16, 21), True),
                                                                ((24, 32), False), ((24, 32), True)]
        with torch.inference_mode():
            per_view = [predictor.model([{"image": v.float(), "height": 30, "width": 40}])[0]["sem_seg"]
                        for v, _ in views]
        expected = sum(p.flip(-1) if f else p for p, (_, f) in zip(per_view, views)) / len(views)
        torch.testing.assert_close(out["sem_seg"], expected, rtol=1e-4, atol=1e-5)
    if "sem_seg" in out:
        assert out["sem_seg"].shape[-2:] == (30, 40)
        # with flips, TTA commutes with mirroring the input
        torch.testing.assert_close(mirrored["sem_seg"], out["sem_seg"].flip(-1), rtol=1e-4, atol=1e-5)
    if "panoptic_seg" in out:
        seg, infos = out["panoptic_seg"]
        assert seg.shape == (30, 40) and infos
        assert torch.equal(mirrored["panoptic_seg"][0], seg.flip(-1))
    if "instances" in out:
        inst, m_inst = out["instances"], mirrored["instances"]
        assert len(inst) > 0 and inst.pred_masks.shape[-2:] == (30, 40)
        order, m_order = inst.scores.argsort(descending=True), m_inst.scores.argsort(descending=True)
        torch.testing.assert_close(m_inst.scores[m_order], inst.scores[order], rtol=1e-4, atol=1e-5)
        assert torch.equal(m_inst.pred_masks[m_order[:5]], inst.pred_masks[order[:5]].flip(-1))
    # several views: not plain inference any more
    plain = tiny_predictors(name)(image)
    key = "sem_seg" if "sem_seg" in out else "instances"
    a, b = (out[key], plain[key]) if key == "sem_seg" else (out[key].scores, plain[key].scores)
    assert not torch.allclose(a, b)


def test_tta_rejects_bad_settings(tiny_predictors):
    from mask2former.modeling.test_time_augmentation import MaskFormerWithTTA

    model = tiny_predictors("semantic").model
    with pytest.raises(ValueError, match="TEST.AUG.MIN_SIZES"):
        MaskFormerWithTTA(model, min_sizes=[], max_size=100, flip=False)
    tta = MaskFormerWithTTA(model, min_sizes=[32], max_size=64, flip=False)
    with pytest.raises(ValueError, match="0..255"):
        tta([{"image": torch.full((3, 8, 8), 0.5)}])


def test_demo_tta_option(demo, tmp_path):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _image(30, 40, 12))
    rc = demo.main(_demo_args("semantic", "--input", str(img), "--output", str(tmp_path / "out"),
                              opts=["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(24, 40)",
                                    "TEST.AUG.MAX_SIZE", "64"]))
    assert rc == 0 and cv2.imread(str(tmp_path / "out" / "a.png")).shape == (30, 40, 3)
