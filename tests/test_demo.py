"""Predictor (test-time resizing), Visualizer and the demo/demo.py command line."""
import importlib.util
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import mask2former as m2f
from mask2former.data import MetadataCatalog
from mask2former.engine import Predictor, resize_shortest_edge
from mask2former.structures import Instances
from mask2former.utils.visualizer import Visualizer, default_color

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "parity"
# Small test sizes keep the tiny models fast on CPU.
SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared parity file {path} is absent in this checkout")
    return path


def _tiny_cfg(name="panoptic", opts=()):
    yaml = _need(PARITY / f"tiny_{name}.yaml")
    pkl = _need(PARITY / f"tiny_{name}.pkl")
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(yaml))
    cfg.merge_from_list(["MODEL.WEIGHTS", str(pkl), "MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(scope="module")
def demo():
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
    io = np.load(_need(PARITY / "tiny_semantic_io.npz"))
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


# ----------------------------------------------------------------------------- demo CLI
def test_demo_cli_writes_one_visualisation_per_readable_image(demo, tmp_path, caplog):
    yaml, pkl = _need(PARITY / "tiny_panoptic.yaml"), _need(PARITY / "tiny_panoptic.pkl")
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "first.png"), _image(40, 60, 1))
    cv2.imwrite(str(src / "second.jpg"), _image(57, 33, 2))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out_dir = tmp_path / "out"
    caplog.set_level(logging.INFO)
    rc = demo.main([
        "--config-file", str(yaml),
        "--input", str(src / "*.png"), str(src / "second.jpg"),
        "--output", str(out_dir),
        "--confidence-threshold", "0.3",
        "--opts", "MODEL.WEIGHTS", str(pkl), *SMALL,
    ])
    assert rc == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["first.png", "second.png"]
    assert cv2.imread(str(out_dir / "first.png")).shape == (40, 60, 3)
    assert cv2.imread(str(out_dir / "second.png")).shape == (57, 33, 3)
    assert any("broken.png" in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)
    assert any("first.png" in r.getMessage() and "s ->" in r.getMessage() for r in caplog.records)


def test_demo_cli_fails_when_nothing_succeeds(demo, tmp_path, caplog):
    yaml, pkl = _need(PARITY / "tiny_panoptic.yaml"), _need(PARITY / "tiny_panoptic.pkl")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    caplog.set_level(logging.INFO)
    args = ["--config-file", str(yaml), "--input", str(bad), str(tmp_path / "missing.png"),
            "--output", str(tmp_path / "out"), "--opts", "MODEL.WEIGHTS", str(pkl), *SMALL]
    assert demo.main(args) == 1
    assert not (tmp_path / "out").exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "bad.jpg" in messages and "missing.png" in messages


def test_demo_cli_missing_weights(demo, tmp_path, caplog):
    yaml = _need(PARITY / "tiny_panoptic.yaml")
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _image(20, 20))
    args = ["--config-file", str(yaml), "--input", str(img), "--output", str(tmp_path / "out"),
            "--opts", "MODEL.WEIGHTS", str(tmp_path / "missing.pkl")]
    assert demo.main(args) == 1
    assert any("MODEL.WEIGHTS" in r.getMessage() for r in caplog.records)


def test_demo_output_paths(demo, tmp_path):
    assert demo.output_paths(str(tmp_path / "vis.png"), ["x/a.jpg"]) == [str(tmp_path / "vis.png")]
    assert demo.output_paths("out", ["x/a.jpg", "y/a.png", "b.jpeg"]) == [
        str(Path("out") / "a.png"), str(Path("out") / "a_1.png"), str(Path("out") / "b.png")]
    assert demo.get_parser().parse_args(["--input", "a.jpg"]).confidence_threshold == 0.5
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    with pytest.raises(SystemExit):  # one output file for two inputs
        demo.main(["--input", str(a), str(b), "--output", str(tmp_path / "vis.png")])
