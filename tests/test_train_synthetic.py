"""End to end on the real pipeline: the synthetic dataset, its mapper and loader, the real model
and criterion, the Trainer. Resuming is exact, training lowers the loss, a corrupt image is
skipped and counted."""
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


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    """A 24/4-image copy of the synthetic dataset under its own names."""
    root = synthetic.ensure_synthetic_dataset(str(tmp_path_factory.mktemp("ds")), splits={"train": 24, "val": 4})
    names = {}
    for split in ("train", "val"):
        name = f"synthetic_small_{split}_{os.getpid()}"
        if name not in DatasetCatalog:
            p = synthetic.split_paths(root, split)
            register_coco_panoptic(name, synthetic.metadata(), p["image_root"], p["panoptic_root"],
                                   p["panoptic_json"], sem_seg_root=p["sem_seg_root"],
                                   instances_json=p["instances_json"])
        names[split] = name
    return root, names


def make_cfg(names, output_dir, max_iter, **overrides):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(CONFIG))
    opts = {
        "DATASETS.TRAIN": (names["train"],), "DATASETS.TEST": (names["val"],),
        "SOLVER.MAX_ITER": max_iter, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.CHECKPOINT_PERIOD": 10,
        "SOLVER.WARMUP_ITERS": 5, "DATALOADER.NUM_WORKERS": 0, "TEST.EVAL_PERIOD": 0,
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 256, "OUTPUT_DIR": str(output_dir), "SEED": 7,
    }
    opts.update(overrides)
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


class NoEvalTrainer(Trainer):
    @classmethod
    def test(cls, cfg, model):
        return {}


def run(cfg, resume=False):
    trainer = NoEvalTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_resume_gives_the_same_final_model(small_synthetic, tmp_path):
    _, names = small_synthetic
    # The first half stops at MAX_ITER 10, so the schedule must not depend on MAX_ITER before
    # iteration 10 (a poly schedule would): a multi-step schedule whose step comes later.
    sched = {"SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR", "SOLVER.STEPS": (15,), "SOLVER.WARMUP_ITERS": 0}
    run(make_cfg(names, tmp_path / "straight", 20, **sched))
    run(make_cfg(names, tmp_path / "split", 10, **sched))
    assert (tmp_path / "split" / "last_checkpoint").read_text().strip() == "model_final.pth"
    run(make_cfg(names, tmp_path / "split", 20, **sched), resume=True)
    a, _ = read_checkpoint(str(tmp_path / "straight" / "model_final.pth"))
    b, _ = read_checkpoint(str(tmp_path / "split" / "model_final.pth"))
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6


def test_corrupt_image_is_skipped_and_counted(small_synthetic, tmp_path):
    root, names = small_synthetic
    p = synthetic.split_paths(root, "train")
    victim = os.path.join(p["image_root"], "000002.png")
    original = open(victim, "rb").read()
    try:
        with open(victim, "wb") as f:
            f.write(original[:40])  # a truncated PNG
        reset_skipped_samples()
        trainer = run(make_cfg(names, tmp_path / "corrupt", 12, **{"SOLVER.IMS_PER_BATCH": 4}))
        assert trainer.iter == 11
        assert sum(skipped_samples().values()) >= 1
    finally:
        with open(victim, "wb") as f:
            f.write(original)


def _train_net(output_dir, seed, *extra, datasets_root):
    """The real command line on the synthetic config, small enough for a test."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *extra,
           "SEED", str(seed), "SOLVER.MAX_ITER", "16", "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.IMS_PER_BATCH", "2",
           "DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "DATASETS.TEST", "()",
           "OUTPUT_DIR", str(output_dir)]
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(REPO))


def _finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_kill_9_and_resume_with_random_seed_reproduces_the_uninterrupted_run(small_synthetic, tmp_path):
    """SEED -1 (every official config's default): a run killed with SIGKILL after a checkpoint and
    resumed with --resume ends with bitwise the weights of an uninterrupted run with the seed the
    first run drew (the checkpoint records it; before it did, the resumed run drew a new data seed)."""
    import signal
    import time

    root, _ = small_synthetic
    datasets_root = os.path.dirname(root)
    run_a = tmp_path / "killed"
    proc = _train_net(run_a, -1, datasets_root=datasets_root)
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

    _finish(_train_net(run_a, -1, "--resume", datasets_root=datasets_root))
    run_b = tmp_path / "straight"
    _finish(_train_net(run_b, drawn, datasets_root=datasets_root))

    a, meta_a = read_checkpoint(str(run_a / "model_final.pth"))
    b, meta_b = read_checkpoint(str(run_b / "model_final.pth"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert meta_a["seed"] == meta_b["seed"] == drawn and meta_a["iteration"] == meta_b["iteration"] == 15
