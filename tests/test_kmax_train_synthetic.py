"""kMaX-DeepLab trains on the real pipeline: configs/synthetic/panoptic_kmax_copy_paste.yaml (the
kMaX mapper with its copy-paste, loader, kMaXDeepLab with its losses, TF2WarmupPolyLR, the Trainer)
on a small copy of the synthetic dataset; the losses go down and the trained model evaluates (PQ,
AP, mIoU)."""
import pytest

from mask2former.engine import Trainer
from tests.conftest import REPO
from tests.test_train_synthetic import logged_run, mean, small_synthetic  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = REPO / "configs" / "synthetic" / "panoptic_kmax_copy_paste.yaml"
# 65 x 65 inputs (32k + 1, as the config's 129), a higher rate: the run takes seconds per iteration
SMALL = {"INPUT.IMAGE_SIZE": (65, 65), "INPUT.MIN_SIZE_TEST": 65, "INPUT.MAX_SIZE_TEST": 65,
         "SOLVER.BASE_LR": 0.004, "MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K": 128,
         "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K": 128}
ITERS = 30
kmax_run = logged_run(CONFIG, SMALL, ITERS, "kmax")


@pytest.mark.slow
def test_loss_goes_down(kmax_run):
    cfg, _, rows = kmax_run
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_panoptic_kmaxdeeplab" and cfg.MODEL.KMAX_DEEPLAB.COPY_PASTE
    assert len(rows) == ITERS and {"loss_pixel_insdis", "loss_aux_semantic", "loss_ce_2"} <= set(rows[0])
    # the mask-ID and semantic cross-entropies: the PQ-style class and dice terms are weighted by the
    # matched mask similarity and class probability (the dice term grows as the classes are learnt),
    # and the instance discrimination falls slowly from scratch
    ce = [sum(v for k, v in r.items() if k.startswith(("loss_mask", "loss_aux_semantic"))) for r in rows]
    assert mean(ce[-5:]) < 0.9 * mean(ce[:5]), ce


@pytest.mark.slow
def test_trained_model_evaluates(kmax_run):
    cfg, trainer, _ = kmax_run
    results = Trainer.test(cfg, trainer.model)
    assert 0.0 <= results["panoptic_seg"]["PQ"] <= 100.0
    assert {"panoptic_seg", "segm", "sem_seg"} <= set(results)
