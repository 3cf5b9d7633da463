"""SeMask trains on the real pipeline: configs/synthetic/semantic_semask.yaml (semantic mapper,
SeMask Swin, BranchMaskFormerHead, SeMaskMaskFormer) on a small copy of the synthetic dataset. Both
the mask-classification losses and the prior loss (loss_cate) go down, and the trained model
evaluates (mIoU) through the Trainer."""
import pytest

from mask2former.engine import Trainer
from tests.conftest import REPO
from tests.test_train_synthetic import logged_run, mean, small_synthetic  # noqa: F401  (fixture)

CONFIG = REPO / "configs" / "synthetic" / "semantic_semask.yaml"
# 64x64 crops of images resized to a short side of 64-96: the whole run takes seconds
SMALL = {"INPUT.MIN_SIZE_TRAIN": (64, 80, 96), "INPUT.CROP.SIZE": (64, 64), "INPUT.SIZE_DIVISIBILITY": 64,
         "INPUT.MIN_SIZE_TEST": 64, "SOLVER.BASE_LR": 0.001}
ITERS = 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


semask_run = logged_run(CONFIG, SMALL, ITERS, "semask")


@pytest.mark.slow
def test_both_losses_go_down(semask_run):
    cfg, _, rows = semask_run
    assert len(rows) == ITERS
    cate = [r["loss_cate"] for r in rows]
    mask_cls = [r["total_loss"] - r["loss_cate"] for r in rows]
    assert cfg.MODEL.MASK_FORMER.CATE_WEIGHT == 0.4 and all(c > 0 for c in cate)
    for name, values in (("loss_cate", cate), ("mask classification losses", mask_cls)):
        first, last = mean(values[:4]), mean(values[-4:])
        assert last < 0.8 * first, f"{name} did not go down: {values}"


@pytest.mark.slow
def test_trained_model_evaluates(semask_run):
    cfg, trainer, _ = semask_run
    results = Trainer.test(cfg, trainer.model)
    sem = results["sem_seg"]
    assert 0.0 <= sem["mIoU"] <= 100.0 and sem["pACC"] > 0.0
    assert set(results) == {"sem_seg"}
