"""kMaX-DeepLab through the command lines, its configs unchanged but for small sizes (issue 17):

* ``train_net.py`` trains configs/synthetic/panoptic_kmax.yaml for two iterations and writes its
  checkpoint; ``--eval-only`` on that checkpoint reports PQ, mask AP and mIoU, the evaluators
  chosen by MODEL.KMAX_DEEPLAB.TEST.*_ON (not MASK_FORMER's), with the numbers of the training
  run's own final evaluation;
* ``demo/demo.py`` draws the checkpoint's predictions on images (with ``--save-json``) and on a
  video; ``--task`` switches MODEL.KMAX_DEEPLAB.TEST.*_ON on; TEST.AUG.ENABLED (kMaX has no
  test-time augmentation) is refused at set-up with a message naming the key;
* the official configs/coco/panoptic_segmentation/kmax_r50.yaml: ``--eval-only`` (tiny widths,
  random weights) on a generated COCO layout gives the PQ, AP and mIoU known from the model's own
  predictions (tests/test_eval_only_families.py's method), and the demo runs it unchanged on the
  CPU with random weights (one forward at its 1281 x 1281 input size).

``train_net.main`` and ``demo.main`` run in this process, as in tests/test_datasets.py and
tests/test_demo.py; the official-config ``--eval-only`` runs in a subprocess as its family tests do.
"""
import json
import logging

import cv2
import pytest

from mask2former.checkpoint import read_checkpoint
from tests.conftest import REPO
from tests.test_cli import TASK_METRICS
from tests.test_datasets import _load_train_net, restore_logging  # noqa: F401 (a fixture)
from tests.test_demo import _count_frames, _image, _write_video, demo  # noqa: F401 (a fixture)
from tests.test_eval_only_families import check_coco_panoptic_with_sem_seg
from tests.test_train_synthetic import small_synthetic  # noqa: F401 (a fixture)

CONFIG = REPO / "configs" / "synthetic" / "panoptic_kmax.yaml"
OFFICIAL = "configs/coco/panoptic_segmentation/kmax_r50.yaml"
# 65 x 65 inputs instead of 129 x 129 (as tests/test_kmax_train_synthetic.py), for speed
SIZES = ["INPUT.IMAGE_SIZE", "[65, 65]", "INPUT.MIN_SIZE_TEST", "65", "INPUT.MAX_SIZE_TEST", "65"]
# the stride-4 output of 65 x 65 has 289 pixels: sample fewer than the config's 512
SAMPLES = ["MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K", "128", "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K", "128"]


def _opts(names, out_dir, *extra):
    return ["DATASETS.TRAIN", f"('{names['train']}',)", "DATASETS.TEST", f"('{names['val']}',)",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out_dir), *SIZES, *extra]


def _train_net(*argv):
    from mask2former.engine.defaults import default_argument_parser

    return _load_train_net().main(default_argument_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def trained(small_synthetic, tmp_path_factory):
    """train_net.py on the kMaX synthetic config: two iterations of two images, then its final
    evaluation on the four validation images; returns (OUTPUT_DIR, dataset names)."""
    names = small_synthetic[1]
    out = tmp_path_factory.mktemp("kmax_train")
    log = logging.getLogger("mask2former")
    state = (list(log.handlers), log.propagate, log.level)
    try:
        _train_net("--config-file", CONFIG, *_opts(names, out, "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", *SAMPLES))
    finally:  # setup() gives the "mask2former" logger handlers of its own
        for h in [h for h in log.handlers if h not in state[0]]:
            log.removeHandler(h)
            h.close()
        log.propagate, log.level = state[1], state[2]
    return out, names


def _eval_results(out_dir):
    return json.loads((out_dir / "eval_results.json").read_text())


@pytest.mark.slow
def test_train_net_trains_kmax_and_writes_its_checkpoint(trained):
    import mask2former as m2f

    out, _ = trained
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    state, meta = read_checkpoint(out / "model_final.pth")
    assert meta["iteration"] == 1
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(out / "config.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab"
    assert sorted(m2f.build_model(cfg, load_weights=False).state_dict()) == sorted(state)
    assert set(_eval_results(out)) == set(TASK_METRICS)


@pytest.mark.slow
def test_eval_only_reports_pq_ap_miou_by_the_kmax_switches(trained, tmp_path, restore_logging):
    out, names = trained
    weights = ["MODEL.WEIGHTS", out / "model_final.pth"]
    _train_net("--eval-only", "--config-file", CONFIG, *_opts(names, tmp_path / "all"), *weights)
    results = _eval_results(tmp_path / "all")
    assert list(results) == ["panoptic_seg", "segm", "sem_seg"]  # the official order
    for task, metrics in TASK_METRICS.items():
        assert metrics <= set(results[task]), task
    assert results == _eval_results(out)  # the training run's final evaluation of the same weights
    # the evaluators follow MODEL.KMAX_DEEPLAB.TEST; MODEL.MASK_FORMER.TEST (Mask2Former's) is not read
    _train_net("--eval-only", "--config-file", CONFIG, *_opts(names, tmp_path / "some"), *weights,
               "MODEL.KMAX_DEEPLAB.TEST.INSTANCE_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
               "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False")
    assert _eval_results(tmp_path / "some") == {k: results[k] for k in ("panoptic_seg", "sem_seg")}


def test_eval_only_refuses_test_time_augmentation_before_evaluating(trained, tmp_path, restore_logging):
    out, names = trained
    with pytest.raises(ValueError, match="TEST.AUG.ENABLED is True but kMaX-DeepLab has no test-time augmentation"):
        _train_net("--eval-only", "--config-file", CONFIG, *_opts(names, tmp_path / "tta"),
                   "MODEL.WEIGHTS", out / "model_final.pth", "TEST.AUG.ENABLED", "True")
    assert not (tmp_path / "tta" / "inference").exists()  # refused before the plain evaluation ran


def _demo_args(out_dir, *args, opts=()):
    return ["--config-file", str(CONFIG), *args, "--opts", "MODEL.WEIGHTS", str(out_dir / "model_final.pth"),
            *SIZES, *opts]


@pytest.mark.slow
def test_demo_draws_kmax_predictions_on_images_and_a_video(demo, trained, tmp_path):
    out, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"a": (70, 90), "b": (128, 128), "c": (40, 30)}
    for name, hw in sizes.items():
        cv2.imwrite(str(images / f"{name}.png"), _image(*hw))
    vis = tmp_path / "vis"
    assert demo.main(_demo_args(out, "--input", str(images), "--output", str(vis), "--save-json",
                                "--batch-size", "2")) == 0
    for name, hw in sizes.items():
        assert cv2.imread(str(vis / f"{name}.png")).shape == (*hw, 3), name
        assert cv2.imread(str(vis / "sem_seg" / f"{name}.png"), cv2.IMREAD_UNCHANGED).shape == hw, name
        assert (vis / "panoptic" / f"{name}.png").is_file()
    panoptic = json.loads((vis / "panoptic.json").read_text())
    assert sorted(a["file_name"] for a in panoptic["annotations"]) == sorted(f"{n}.png" for n in sizes)
    assert isinstance(json.loads((vis / "instances.json").read_text()), list)

    video = _write_video(tmp_path / "clip.mp4", 6, size=(64, 48))
    assert demo.main(_demo_args(out, "--video-input", str(video), "--output", str(tmp_path / "vid"),
                                "--batch-size", "4")) == 0
    decoded, (count, width, height) = _count_frames(tmp_path / "vid" / "clip.mp4")
    assert decoded == count == 6 and (width, height) == (64, 48)


@pytest.mark.slow
def test_demo_task_switches_the_kmax_output_on(demo, trained, tmp_path, caplog):
    out, _ = trained
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), _image(50, 60))
    caplog.set_level(logging.INFO)
    rc = demo.main(_demo_args(out, "--input", str(image), "--output", str(tmp_path / "vis"), "--save-json",
                              "--task", "semantic", opts=["MODEL.KMAX_DEEPLAB.TEST.SEMANTIC_ON", "False"]))
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["a.png", "sem_seg"]
    assert cv2.imread(str(tmp_path / "vis" / "sem_seg" / "a.png"), cv2.IMREAD_UNCHANGED).shape == (50, 60)
    assert any("setting MODEL.KMAX_DEEPLAB.TEST.SEMANTIC_ON True" in r.getMessage() for r in caplog.records)


def test_test_time_augmentation_is_refused_for_kmax(demo, tmp_path, caplog):
    """kMaX runs at one input size and has no TTA (nor has the official code): the demo stops at
    set-up with the key named, instead of failing on the first image."""
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), _image(20, 20))
    args = ["--config-file", str(CONFIG), "--input", str(image), "--output", str(tmp_path / "vis"), "--opts",
            *SIZES, "TEST.AUG.ENABLED", "True"]
    assert demo.main(args) == 1
    assert not (tmp_path / "vis").exists()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "TEST.AUG.ENABLED is True but kMaX-DeepLab has no test-time augmentation" in messages


# ----------------------------------------------------------------------------- the official config
# tiny widths for the official R50 config (random weights): its image size 97 x 97, the 64 x 96
# layout images resized to 65 x 97 (long side = IMAGE_SIZE, the input convention), every output
# on and thresholds at 0 (random weights give low class scores)
KMAX_TINY = ["MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_LAYERS", "[1, 1, 1, 1]",
             "MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_CHANNELS", "[64, 32, 16, 16]",
             "MODEL.KMAX_DEEPLAB.TRANS_DEC.DEC_LAYERS", "[1, 1, 1]",
             "MODEL.KMAX_DEEPLAB.TRANS_DEC.IN_CHANNELS", "[256, 128, 64, 64]",
             "MODEL.KMAX_DEEPLAB.TRANS_DEC.NUM_OBJECT_QUERIES", "16",
             "INPUT.IMAGE_SIZE", "[97, 97]", "INPUT.MIN_SIZE_TEST", "97", "INPUT.MAX_SIZE_TEST", "97",
             "MODEL.KMAX_DEEPLAB.TEST.SEMANTIC_ON", "True", "MODEL.KMAX_DEEPLAB.TEST.INSTANCE_ON", "True",
             "MODEL.KMAX_DEEPLAB.TEST.CLASS_THRESHOLD_THING", "0.0",
             "MODEL.KMAX_DEEPLAB.TEST.CLASS_THRESHOLD_STUFF", "0.0",
             "MODEL.KMAX_DEEPLAB.TEST.PIXEL_CONFIDENCE_THRESHOLD", "0.0"]


@pytest.mark.slow
def test_official_kmax_config_eval_only_on_a_coco_layout(tmp_path):
    """PQ (panoptic_val2017), mask AP (instances_val2017.json) and mIoU (panoptic_semseg_val2017)
    of coco_2017_val_panoptic_with_sem_seg, the official kMaX config's test set."""
    preds = check_coco_panoptic_with_sem_seg(tmp_path, OFFICIAL, KMAX_TINY)
    # the random model's outputs are not empty: the counted metrics are not all trivial
    assert all(p.pan[1] for p in preds) and any(p.inst for p in preds)


@pytest.mark.slow
def test_official_kmax_config_runs_in_the_demo_on_the_cpu(demo, tmp_path, caplog):
    """configs/coco/panoptic_segmentation/kmax_r50.yaml as it is (1281 x 1281, R50, SyncBN) with
    random weights (MODEL.WEIGHTS "": no checkpoint exists here) on a small image."""
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), _image(40, 60))
    caplog.set_level(logging.INFO)
    args = ["--config-file", str(REPO / OFFICIAL), "--input", str(image), "--output", str(tmp_path / "vis.png"),
            "--opts", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    assert demo.main(args) == 0
    assert cv2.imread(str(tmp_path / "vis.png")).shape == (40, 60, 3)
    assert any("1 of 1 images processed" in r.getMessage() for r in caplog.records)
