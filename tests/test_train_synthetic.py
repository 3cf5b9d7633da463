"""End to end on the real pipeline: the synthetic dataset, its mapper and loader, the real model
and criterion, the Trainer. Resuming is exact, training lowers the loss, a corrupt image is
skipped and counted."""
import os

import pytest
import torch

import mask2former as m2f
from mask2former.checkpoint import read_checkpoint
from mask2former.data import DatasetCatalog, MetadataCatalog, reset_skipped_samples, skipped_samples
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
