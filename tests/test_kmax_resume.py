"""kMaX-DeepLab training resumes exactly: configs/synthetic/panoptic_kmax.yaml (its mapper, the
kMaX losses with their pixel sampling, TF2WarmupPolyLR, the Trainer) on a small copy of the
synthetic set. A run that dies after a checkpoint (simulated as in test_trainer's
test_resume_exactness: the loader raises, so nothing after the checkpoint is saved) and is resumed
ends with bitwise the weights of the uninterrupted run, with a fixed SEED and with SEED -1 (the
trainer draws the seed, the checkpoint records it, the uninterrupted run is given that seed).

This needs the state of the criterion's own pixel-sampling generator in the checkpoint (the
per-rank "modules" entry of "rng_states") and, with SEED -1, the model built with the run's
resolved seed rather than a second seed of its own.

Sized for speed: 33 x 33 inputs (9 x 9 stride-4 pixels, of which 32 are sampled), 4 iterations,
one torch thread."""
import pytest
import torch

from mask2former.checkpoint import read_checkpoint
from mask2former.engine import Trainer
from tests.conftest import REPO
from tests.test_train_synthetic import NoEvalTrainer, make_cfg, small_synthetic  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = REPO / "configs" / "synthetic" / "panoptic_kmax.yaml"
SMALL = {"INPUT.IMAGE_SIZE": (33, 33), "INPUT.MIN_SIZE_TEST": 33, "INPUT.MAX_SIZE_TEST": 33,
         "MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K": 32, "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K": 32,
         "SOLVER.WARMUP_ITERS": 2, "SOLVER.CHECKPOINT_PERIOD": 2}
ITERS = 4
DIES_BEFORE = 3  # iterations 0-2 run, the checkpoint of iteration 1 is the last one written


class Killed(RuntimeError):
    pass


def loader_dying_before(iteration):
    """The real training loader, raising when asked for the batch of ``iteration``."""

    def build(cfg, start_iter):
        def batches():
            for i, batch in enumerate(Trainer.build_train_loader(cfg, start_iter), start_iter):
                if i == iteration:
                    raise Killed(f"simulated kill before iteration {i}")
                yield batch

        return batches()

    return build


def train(cfg, resume=False, **kw):
    trainer = NoEvalTrainer(cfg, progress_bar=False, tensorboard=False, **kw)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, -1])
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(small_synthetic, tmp_path, seed):
    _, names = small_synthetic
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        train(make_cfg(names, killed, ITERS, config=CONFIG, SEED=seed, **SMALL),
              build_train_loader=loader_dying_before(DIES_BEFORE))
    assert (killed / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    _, meta = read_checkpoint(str(killed / "model_0000001.pth"))
    drawn = meta["seed"]
    assert drawn == seed if seed >= 0 else drawn >= 0
    # the criterion's generator has drawn pixels by then, and its state is in the checkpoint
    assert set(meta["rng_states"][0]["modules"]) == {"criterion"}

    resumed = train(make_cfg(names, killed, ITERS, config=CONFIG, SEED=seed, **SMALL), resume=True)
    assert resumed.start_iter == 2 and resumed.seed == drawn
    straight = tmp_path / "straight"
    train(make_cfg(names, straight, ITERS, config=CONFIG, SEED=drawn, **SMALL))

    a, meta_a = read_checkpoint(str(straight / "model_final.pth"))
    b, meta_b = read_checkpoint(str(killed / "model_final.pth"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert meta_a["iteration"] == meta_b["iteration"] == ITERS - 1
    gen_a, gen_b = (m["rng_states"][0]["modules"]["criterion"] for m in (meta_a, meta_b))
    assert gen_a.keys() == gen_b.keys() == {"cpu"} and torch.equal(gen_a["cpu"], gen_b["cpu"])
