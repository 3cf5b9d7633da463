"""The command lines of the README, run as a user runs them (subprocesses from the repository root):

* ``train_net.py`` trains the synthetic config on a small generated copy of the synthetic dataset
  and writes config.yaml, log.txt, metrics.json, checkpoints, last_checkpoint and
  eval_results.json (panoptic, instance and semantic metrics);
* ``train_net.py --eval-only --resume`` evaluates the weights OUTPUT_DIR/last_checkpoint names;
* ``MODEL.DEVICE cuda`` without CUDA: a warning, and training runs on the CPU;
* ``python -m mask2former.ops build`` and ``python -m mask2former.data.datasets.custom FILE --load``.

Subprocesses use one thread each (OMP_NUM_THREADS=1): the machine is shared.
"""
import json
import os
import shutil
import uuid

import pytest
import torch
import yaml

import mask2former as m2f
from mask2former.checkpoint import read_checkpoint
from mask2former.data.datasets import custom, synthetic
from tests.conftest import REPO, run_python, skip_or_fail_in_ci

CONFIG = REPO / "configs" / "synthetic" / "panoptic.yaml"
TRAIN = 8  # generated training images: 4 iterations of 2 are one epoch
VAL = 2
TINY = ["SEED", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.IMAGE_SIZE", "64",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]
TASK_METRICS = {
    "panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"},
    "segm": {"AP", "AP50", "AP75", "APs", "APm", "APl"},
    "sem_seg": {"mIoU", "fwIoU", "mACC", "pACC"},
}


def _run(args, datasets_root=None, **env):
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(datasets_root)
    return run_python(args, timeout=600, OMP_NUM_THREADS="1", **env)


def _ok(res):
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return res


def _train_net(*args, datasets_root):
    return _run([REPO / "train_net.py", "--config-file", CONFIG, *args], datasets_root=datasets_root)


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """$DETECTRON2_DATASETS holding a small synthetic dataset: the config's synthetic_panoptic_*
    names then read it (and do not generate the full 1000 images)."""
    root = tmp_path_factory.mktemp("datasets")
    synthetic.ensure_synthetic_dataset(str(root), splits={"train": TRAIN, "val": VAL})
    return root


@pytest.fixture(scope="module")
def trained(datasets_root, tmp_path_factory):
    """One train_net.py run: 4 iterations, checkpoints every 2, evaluation on the val split."""
    out = tmp_path_factory.mktemp("train")
    res = _ok(_train_net(*TINY, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out,
                         datasets_root=datasets_root))
    return out, res


@pytest.mark.slow
def test_train_net_trains_and_writes_its_outputs(trained):
    out, res = trained
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["SOLVER"]["MAX_ITER"] == 4 and saved["OUTPUT_DIR"] == str(out)
    assert saved["DATASETS"]["TRAIN"] == ["synthetic_panoptic_train"]

    log = (out / "log.txt").read_text()
    for text in ("Starting training from iteration 0", "Training loader: 8 images",
                 f"Saved checkpoint {out / 'model_final.pth'}", "Evaluation results for synthetic_panoptic_val"):
        assert text in log, text

    state, meta = read_checkpoint(out / "model_final.pth")
    assert meta["iteration"] == 3 and meta["seed"] == 3
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(out / "config.yaml"))
    model = m2f.build_model(cfg, load_weights=False)
    assert sorted(model.state_dict()) == sorted(state)

    results = _json(out / "eval_results.json")
    assert set(results) == set(TASK_METRICS)
    for task, names in TASK_METRICS.items():
        assert names <= set(results[task]), task
    assert all(0 <= results["sem_seg"][k] <= 100 for k in TASK_METRICS["sem_seg"])
    assert results["sem_seg"]["pACC"] > 0  # some pixels are right, whatever the model learnt in 4 steps

    # metrics.json: the training line of the last iteration and the final evaluation, same numbers
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [3, 3]
    assert "total_loss" in rows[0] and "lr" in rows[0]
    assert rows[1]["panoptic_seg/PQ"] == results["panoptic_seg"]["PQ"]
    assert rows[1]["sem_seg/mIoU"] == results["sem_seg"]["mIoU"]
    assert "sem_seg/mIoU" in res.stdout  # the results table is printed


@pytest.mark.slow
def test_eval_only_resume_evaluates_the_last_checkpoint(trained, datasets_root, tmp_path):
    """--eval-only --resume takes OUTPUT_DIR/last_checkpoint (here model_0000001.pth) over
    MODEL.WEIGHTS (model_final.pth): its predictions and metrics are those of --eval-only with
    MODEL.WEIGHTS model_0000001.pth, and its predictions differ from model_final.pth's."""
    out, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth\n")
    _ok(_train_net("--eval-only", "--resume", *TINY, "OUTPUT_DIR", resumed, "MODEL.WEIGHTS", out / "model_final.pth",
                   datasets_root=datasets_root))
    direct = tmp_path / "direct"
    _ok(_train_net("--eval-only", *TINY, "OUTPUT_DIR", direct, "MODEL.WEIGHTS", out / "model_0000001.pth",
                   datasets_root=datasets_root))

    preds = {d: _json(d / "inference" / "coco_instances_results.json") for d in (resumed, direct, out)}
    assert preds[resumed] and preds[resumed] == preds[direct]
    assert preds[resumed] != preds[out]  # model_final.pth's, from the end of training
    assert _json(resumed / "eval_results.json") == _json(direct / "eval_results.json")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the fallback to the CPU cannot happen "
                    "here (test_trainer checks it in-process with torch.cuda.is_available patched)")
def test_cuda_device_without_cuda_trains_on_the_cpu_with_a_warning(datasets_root, tmp_path):
    out = tmp_path / "out"
    _ok(_train_net(*TINY, "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", out,
                   datasets_root=datasets_root))
    log = (out / "log.txt").read_text()
    assert "MODEL.DEVICE is 'cuda' but CUDA is not available; using the CPU" in log
    assert "CUDA available: False" in log
    _, meta = read_checkpoint(out / "model_final.pth")
    assert meta["iteration"] == 0


@pytest.mark.slow
def test_ops_build_command(monkeypatch, capsys):
    from mask2former.ops.__main__ import main as ops_main
    from mask2former.ops.backend import env, toolchain

    missing = toolchain.missing_toolchain()
    if missing:
        skip_or_fail_in_ci(f"the compiled ops need a toolchain: {missing}")
    if env.mode() == "reference":
        pytest.skip("M2F_OPS=reference is set for this session")
    res = _ok(_run(["-m", "mask2former.ops", "build"]))
    first = res.stdout.splitlines()[0]
    assert first.startswith("built in ") and ": " in first
    library = first.split(": ", 1)[1]
    assert os.path.isfile(library), first
    assert "cpu backend: compiled CPU" in res.stdout and f"library: {library}" in res.stdout

    # forced reference: nothing is built, and the command says so (in-process: `python -m` runs
    # sys.exit(main()), and the mode is read from the environment at each call)
    monkeypatch.setenv("M2F_OPS", "reference")
    assert ops_main(["build"]) == 1
    out, err = capsys.readouterr()
    assert "built in" not in out and "M2F_OPS=reference: not building the compiled kernels" in err


def _datasets_yaml(path, tag, entries):
    lines = ["datasets:"] + [f"  - {{name: {name}_{tag}, {body}}}" for name, body in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_custom_datasets_check_command(datasets_root, tmp_path, capsys):
    s = os.path.relpath(datasets_root / "synthetic", tmp_path)
    tag = uuid.uuid4().hex[:8]
    good = _datasets_yaml(tmp_path / "good.yaml", tag, [
        ("pan", f"type: coco_panoptic, image_root: {s}/train2017, panoptic_root: {s}/annotations/panoptic_train2017, "
                f"panoptic_json: {s}/annotations/panoptic_train2017.json, sem_seg_root: {s}/panoptic_semseg_train2017, "
                f"instances_json: {s}/annotations/instances_train2017.json"),
        ("ins", f"type: coco_instances, image_root: {s}/val2017, json_file: {s}/annotations/instances_val2017.json"),
        ("sem", f"type: sem_seg, image_root: {s}/train2017, gt_root: {s}/panoptic_semseg_train2017, "
                "classes: [circle, square, triangle, sky, grass], image_ext: png"),
    ])
    res = _ok(_run(["-m", "mask2former.data.datasets.custom", good, "--load"]))
    assert res.stdout.splitlines() == [
        f"pan_{tag}: coco_panoptic_seg, 5 classes, {TRAIN} images",
        f"ins_{tag}: coco, 3 classes, {VAL} images",
        f"sem_{tag}: sem_seg, 5 classes, {TRAIN} images",
    ]

    # invalid files: exit status 1 and a message naming the file and the entry (main() is what
    # `python -m` runs, as sys.exit(main()))
    bad = _datasets_yaml(tmp_path / "bad.yaml", tag, [
        ("ok", f"type: sem_seg, image_root: {s}/train2017, gt_root: {s}/panoptic_semseg_train2017, classes: [a]"),
        ("bad", f"type: coco_instances, image_root: {s}/val2017, json_file: nope.json"),
    ])
    assert custom.main([str(bad), "--load"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: datasets[1] ('bad_{tag}'): annotation file not found" in err and "nope.json" in err
    unloadable = _datasets_yaml(tmp_path / "unloadable.yaml", tag, [
        ("noimg", f"type: sem_seg, image_root: {s}/missing, gt_root: {s}/panoptic_semseg_train2017, classes: [a]"),
    ])
    try:
        assert custom.main([str(unloadable), "--load"]) == 1
    finally:
        custom.unregister([f"noimg_{tag}"])
    err = capsys.readouterr().err
    assert f"{unloadable}: dataset 'noimg_{tag}': " in err and "missing" in err
