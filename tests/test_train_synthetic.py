"""End to end on the real pipeline: the synthetic dataset, its mapper and loader, the real model
and criterion, the Trainer. Resuming is exact (with data-loader workers, and through the command
line after kill -9), training lowers the loss, a corrupt image is skipped and counted.

Sized for speed: 64x64 training crops (INPUT.IMAGE_SIZE), runs of 6 to 8 iterations, one torch
thread (the machine is shared; two threads on two busy cores are many times slower)."""
import json
import os

import pytest
import torch

import mask2former as m2f
from mask2former.checkpoint import read_checkpoint
from mask2former.data import DatasetCatalog, reset_skipped_samples, skipped_samples
from mask2former.data.datasets import register_coco_panoptic
from mask2former.data.datasets import synthetic
from mask2former.engine import Trainer
from tests.conftest import REPO

CONFIG = REPO / "configs" / "synthetic" / "panoptic.yaml"
SMALL = ("INPUT.IMAGE_SIZE", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    """A 24/4-image copy of the synthetic dataset under its own names."""
    where = tmp_path_factory.mktemp("ds")
    root = synthetic.ensure_synthetic_dataset(str(where), splits={"train": 24, "val": 4})
    names = {}
    for split in ("train", "val"):
        # one name per copy: another test module (test_mp_former_model) makes its own copy
        name = f"synthetic_small_{split}_{os.getpid()}_{where.name}"
        if name not in DatasetCatalog:
            p = synthetic.split_paths(root, split)
            register_coco_panoptic(name, synthetic.metadata(), p["image_root"], p["panoptic_root"],
                                   p["panoptic_json"], sem_seg_root=p["sem_seg_root"],
                                   instances_json=p["instances_json"])
        names[split] = name
    return root, names


def make_cfg(names, output_dir, max_iter, config=CONFIG, **overrides):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(config))
    opts = {
        "DATASETS.TRAIN": (names["train"],), "DATASETS.TEST": (names["val"],),
        "SOLVER.MAX_ITER": max_iter, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.CHECKPOINT_PERIOD": 10,
        "SOLVER.WARMUP_ITERS": 5, "DATALOADER.NUM_WORKERS": 0, "TEST.EVAL_PERIOD": 0,
        "OUTPUT_DIR": str(output_dir), "SEED": 7, **dict(zip(SMALL[::2], SMALL[1::2])),
    }
    opts.update(overrides)
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


def train_logged(cfg):
    """Train ``cfg`` from scratch logging every iteration; (trainer, the metrics.json rows with losses)."""
    trainer = Trainer(cfg, log_period=1)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        return trainer, [r for r in map(json.loads, f) if "total_loss" in r]


def mean(values):
    return sum(values) / len(values)


def logged_run(config, overrides, iters, name):
    """A module-scoped fixture: (cfg, trainer, rows) of :func:`train_logged` on ``small_synthetic``
    with ``config`` and ``overrides`` for ``iters`` iterations (assign it in the test module, which
    must also import ``small_synthetic``)."""

    @pytest.fixture(scope="module")
    def run_fixture(small_synthetic, tmp_path_factory):
        cfg = make_cfg(small_synthetic[1], tmp_path_factory.mktemp(name), iters, config=config, **overrides)
        return (cfg,) + train_logged(cfg)

    return run_fixture


class NoEvalTrainer(Trainer):
    @classmethod
    def test(cls, cfg, model):
        return {}


def run(cfg, resume=False, **kw):
    trainer = NoEvalTrainer(cfg, **kw)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


# The first half of the resume test stops at MAX_ITER 4, so the schedule must not depend on
# MAX_ITER before iteration 4 (a poly schedule would): a multi-step schedule whose step comes in
# the resumed half. Two loader workers: their processes restart on resume.
RESUME = {"SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR", "SOLVER.STEPS": (6,), "SOLVER.WARMUP_ITERS": 0,
          "DATALOADER.NUM_WORKERS": 2}


@pytest.fixture(scope="module")
def straight_run(small_synthetic, tmp_path_factory):
    """An uninterrupted 8-iteration run, metrics.json written every iteration."""
    out = tmp_path_factory.mktemp("straight")
    run(make_cfg(small_synthetic[1], out, 8, **RESUME), log_period=1)
    return out


@pytest.mark.slow
def test_resume_gives_the_same_final_model(small_synthetic, straight_run, tmp_path):
    """With DATALOADER.NUM_WORKERS 2, a run stopped at a checkpoint and resumed ends with bitwise
    the weights of the uninterrupted run."""
    _, names = small_synthetic
    run(make_cfg(names, tmp_path / "split", 4, **RESUME))
    assert (tmp_path / "split" / "last_checkpoint").read_text().strip() == "model_final.pth"
    trainer = run(make_cfg(names, tmp_path / "split", 8, **RESUME), resume=True)
    assert trainer.start_iter == 4
    a, _ = read_checkpoint(str(straight_run / "model_final.pth"))
    b, _ = read_checkpoint(str(tmp_path / "split" / "model_final.pth"))
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_training_lowers_the_loss(straight_run):
    """Over the 8 iterations of the uninterrupted run, the mean total loss of the last three is
    at least 10 % below that of the first three (about 14 % here)."""
    with open(straight_run / "metrics.json") as f:
        losses = [r["total_loss"] for r in map(json.loads, f) if "total_loss" in r]
    assert len(losses) == 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses


@pytest.mark.slow
def test_corrupt_image_is_skipped_and_counted(small_synthetic, tmp_path):
    root, names = small_synthetic
    p = synthetic.split_paths(root, "train")
    victim = os.path.join(p["image_root"], "000002.png")
    original = open(victim, "rb").read()
    try:
        with open(victim, "wb") as f:
            f.write(original[:40])  # a truncated PNG
        reset_skipped_samples()
        # 6 batches of 4 are one epoch of the 24 images: the victim is drawn exactly once
        trainer = run(make_cfg(names, tmp_path / "corrupt", 6, **{"SOLVER.IMS_PER_BATCH": 4}))
        assert trainer.iter == 5
        assert sum(skipped_samples().values()) >= 1
    finally:
        with open(victim, "wb") as f:
            f.write(original)


# kMaX-DeepLab with its copy-paste (more of the mapper's and the criterion's own randomness), at
# 65 x 65 (32k + 1) with few sampled pixels
KMAX = (REPO / "configs" / "synthetic" / "panoptic_kmax_copy_paste.yaml",
        ("INPUT.IMAGE_SIZE", "[65, 65]", "MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K", "64",
         "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K", "64"))


def _train_net(output_dir, seed, *extra, datasets_root, system=(CONFIG, SMALL)):
    """The real command line on a synthetic config (``system``: config path, size overrides), small
    enough for a test."""
    import subprocess
    import sys

    config, small = system
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config), *extra,
           "SEED", str(seed), "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "2",
           "DATALOADER.NUM_WORKERS", "0", *small, "DATASETS.TEST", "()",
           "OUTPUT_DIR", str(output_dir)]
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(REPO))


def _finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("system", [(CONFIG, SMALL), KMAX], ids=["mask2former", "kmax"])
def test_kill_9_and_resume_with_random_seed_reproduces_the_uninterrupted_run(small_synthetic, tmp_path, system):
    """SEED -1 (every official config's default): a run killed with SIGKILL after a checkpoint and
    resumed with --resume ends with bitwise the weights of an uninterrupted run with the seed the
    first run drew (the checkpoint records it; before it did, the resumed run drew a new data seed).
    kMaX-DeepLab also needs its criterion's pixel-sampling generators in the checkpoint."""
    import signal
    import time

    root, _ = small_synthetic
    datasets_root = os.path.dirname(root)
    run_a = tmp_path / "killed"
    proc = _train_net(run_a, -1, datasets_root=datasets_root, system=system)
    try:
        deadline = time.time() + 300
        while not (run_a / "last_checkpoint").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = (run_a / "last_checkpoint").read_text().strip()
    assert killed_at != "model_final.pth" and not (run_a / "model_final.pth").exists()
    _, meta = read_checkpoint(str(run_a / killed_at))
    drawn = meta["seed"]
    assert drawn >= 0
    # the drawn seed is stated in log.txt (README: "drawn and logged when SEED is negative")
    log = (run_a / "log.txt").read_text()
    assert f"Using a randomly drawn seed {drawn} (set SEED {drawn} to repeat this run)" in log
    assert log.count("Using a randomly drawn seed") == 1

    # the resumed run and the uninterrupted one are independent: one thread each, side by side
    run_b = tmp_path / "straight"
    resumed = _train_net(run_a, -1, "--resume", datasets_root=datasets_root, system=system)
    straight = _train_net(run_b, drawn, datasets_root=datasets_root, system=system)
    _finish(resumed)
    _finish(straight)

    a, meta_a = read_checkpoint(str(run_a / "model_final.pth"))
    b, meta_b = read_checkpoint(str(run_b / "model_final.pth"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert meta_a["seed"] == meta_b["seed"] == drawn and meta_a["iteration"] == meta_b["iteration"] == 7
