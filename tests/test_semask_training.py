"""SeMask trains on the real pipeline: configs/synthetic/semantic_semask.yaml (semantic mapper,
SeMask Swin, BranchMaskFormerHead, SeMaskMaskFormer) on a small copy of the synthetic dataset. Both
the mask-classification losses and the prior loss (loss_cate) go down, and the trained model
evaluates (mIoU) through the Trainer."""
import json

import pytest

from mask2former.engine import Trainer
from tests.conftest import REPO
from tests.test_train_synthetic import make_cfg, small_synthetic  # noqa: F401  (fixture)

CONFIG = REPO / "configs" / "synthetic" / "semantic_semask.yaml"
# 64x64 crops of images resized to a short side of 64-96: the whole run takes seconds
SMALL = {"INPUT.MIN_SIZE_TRAIN": (64, 80, 96), "INPUT.CROP.SIZE": (64, 64), "INPUT.SIZE_DIVISIBILITY": 64,
         "INPUT.MIN_SIZE_TEST": 64, "SOLVER.BASE_LR": 0.001}
ITERS = 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def semask_run(small_synthetic, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("semask")
    cfg = make_cfg(small_synthetic[1], out, ITERS, config=CONFIG, **SMALL)
    trainer = Trainer(cfg, log_period=1)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(out / "metrics.json") as f:
        rows = [r for r in map(json.loads, f) if "total_loss" in r]
    return cfg, trainer, rows


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_both_losses_go_down(semask_run):
    cfg, _, rows = semask_run
    assert len(rows) == ITERS
    cate = [r["loss_cate"] for r in rows]
    mask_cls = [r["total_loss"] - r["loss_cate"] for r in rows]
    assert cfg.MODEL.MASK_FORMER.CATE_WEIGHT == 0.4 and all(c > 0 for c in cate)
    for name, values in (("loss_cate", cate), ("mask classification losses", mask_cls)):
        first, last = _mean(values[:4]), _mean(values[-4:])
        assert last < 0.8 * first, f"{name} did not go down: {values}"


@pytest.mark.slow
def test_trained_model_evaluates(semask_run):
    cfg, trainer, _ = semask_run
    results = Trainer.test(cfg, trainer.model)
    sem = results["sem_seg"]
    assert 0.0 <= sem["mIoU"] <= 100.0 and sem["pACC"] > 0.0
    assert set(results) == {"sem_seg"}
