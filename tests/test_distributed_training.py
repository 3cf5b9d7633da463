"""Mask2Former trained and evaluated in 2 processes (torchrun, gloo, CPU) against 1 process, on the
real pipeline: ``train_net.main`` (Trainer, synthetic dataset and its LSJ mapper, training loader
and sampler, DistributedDataParallel, optimizer, scheduler, checkpoint), run as a user runs it.

Training: ``configs/synthetic/panoptic.yaml`` at 64 x 64, SEED 5, 3 iterations, global batch
SOLVER.IMS_PER_BATCH = 4 (2 processes x 2 images, or 1 process x 4; the loader splits the global
batch by the world size, as Detectron2 does). The global sample stream gives the 1-process
iteration i the positions 4i..4i+3 and rank r the positions 4i+r and 4i+r+2 (a subset of the
same set), and every sample is augmented by a generator keyed by (seed, position), not by rank or
loader worker (the 2-process run uses a loader worker, the 1-process run none). The test checks
both on what the runs actually fed the model. (The synthetic images are square: the aspect-ratio
grouping of the config forms a single group, which keeps the batches of consecutive positions.)

What legitimately makes the two runs differ, and how the test's config settles it:

(a) Point sampling. The matcher's uniform points and the mask losses' importance-sampled points
    are drawn from each process' global RNG (seeded SEED + rank, as in the official code), so a
    2-process run draws other points than a 1-process run: they agree in distribution only. The
    draws are not keyed by the image's stream position because the model never sees it (batches
    are lists of images), and keying them would change every single-process run's numbers. Here
    both runs replace the two draws by the same fixed function (:func:`fix_point_draws`): each
    call reseeds the global RNG with POINT_SEED for the draw and restores it, the criterion per
    matched mask, so a mask's points depend only on its own logits (the importance sampling by
    uncertainty still runs) and an image's matcher points are the same in every run.
(b) BatchNorm statistics are per process (SyncBN is CUDA-only in torch; the trainer falls back
    to BatchNorm2d on CPU): batch statistics over 2 images are not those over 4. The test uses
    FrozenBN, the official configs' backbone norm; GroupNorm/LayerNorm elsewhere are per image.
(c) num_masks (the normaliser of the mask and dice losses) is all-reduced and averaged over the
    processes, clamped >= 1, as in the official criterion: with DDP's gradient averaging the
    mask terms equal the 1-process ones whatever each rank's object count. The test requires the
    ranks' object counts to differ in some iteration, so a per-process num_masks would show.
(d) Per-image work (matching, the mask losses) is the same; the classification loss is a mean
    over the process' queries weighted by ``empty_weight``: with NO_OBJECT_WEIGHT != 1 its
    normaliser (the weight sum) depends on how many objects the process holds, so 2 x b differs
    from 1 x 2b (in the official code too). The test sets NO_OBJECT_WEIGHT 1.0, a plain mean.
Optimizer: SGD with momentum and no gradient clipping. AdamW and norm clipping are invariant to a
global gradient scale (a sum instead of a mean over ranks would pass) and AdamW's first steps
move every weight by about +-lr whatever its gradient's size, so a gradient that is zero up to
rounding flips sign between runs.

Tolerance: the runs add the same per-image gradient terms in another order (the 1-process
backward sums 4 images in one reduction, each rank sums 2 and gloo's all-reduce adds the two
partial sums), so gradients agree to float32 rounding (about 1e-6 relative per tensor at the
first step); after 3 steps each tensor's update (final - initial weights) must agree to
UPDATE_RTOL relative (norm over the tensor). Everything else must be exact: the ranks start
from the same weights and end with bitwise equal ones.

Evaluation: ``train_net.py --eval-only`` of the tiny panoptic parity model on ``../shared/eval``
(5 images, so the ranks hold 3 and 2; panoptic, instance and semantic metrics in mid-range) in
2 processes equals 1 process exactly: each image is inferred alone (batch 1, same weights, same
arithmetic) and the evaluators gather the predictions in rank order, i.e. dataset order.

Run as a script (``python tests/test_distributed_training.py ARGS``, under torchrun or not) this
file is ``train_net.py`` with :class:`ProbedTrainer`.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: sys.path[0] is tests/
    sys.path.insert(0, str(REPO))

import mask2former  # noqa: E402
from mask2former.checkpoint import read_checkpoint  # noqa: E402
from mask2former.data.datasets import synthetic  # noqa: E402
from mask2former.engine import Trainer  # noqa: E402
from mask2former.utils import comm  # noqa: E402
from mask2former.utils.rng import seeded_global_rngs  # noqa: E402
from tests.conftest import EVAL, PARITY, require_shared, run_python  # noqa: E402

POINT_SEED = 1234
UPDATE_RTOL = 2e-4
CONFIG = REPO / "configs" / "synthetic" / "panoptic.yaml"
TRAIN_OPTS = [
    "SEED", "5", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
    "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.001", "SOLVER.MOMENTUM", "0.9", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "INPUT.IMAGE_SIZE", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT", "1.0", "DATASETS.TEST", "()",
]
INITIAL_WEIGHTS = "initial_weights.pth"
EVAL_DATASET = "coco_2017_val_panoptic_with_sem_seg"


def fix_point_draws(criterion) -> None:
    """Make ``criterion``'s (and its matcher's) random point draws a fixed function of their input
    (see (a) in the module docstring); the global RNG streams are left as they were."""
    matcher_points, criterion_points = criterion.matcher.sample_points, criterion.sample_points

    def matcher_sample_points(device):
        with seeded_global_rngs(POINT_SEED):
            return matcher_points(device)

    def criterion_sample_points(mask_logits):
        chosen = []
        for one in mask_logits.split(1):
            with seeded_global_rngs(POINT_SEED):
                chosen.append(criterion_points(one))
        return torch.cat(chosen)

    criterion.matcher.sample_points = matcher_sample_points
    criterion.sample_points = criterion_sample_points


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digest(model) -> str:
    state = model.state_dict()
    return digest(state[k] for k in sorted(state))


class ProbedTrainer(Trainer):
    """The package's Trainer with fixed point draws; it writes ``OUTPUT_DIR/probe.rank{r}.json``:
    the process group seen, the samples of every iteration (image id, object count, digest of the
    augmented image and masks), digests of the start and final weights; 1 process also saves the
    start weights (INITIAL_WEIGHTS)."""

    batches = []  # this process' batches (the loader is built by a classmethod)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        fix_point_draws(model.criterion)
        return model

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        loader = super().build_train_loader(cfg, start_iter)

        def recorded():
            for batch in loader:
                cls.batches.append([[s["image_id"], len(s["instances"].gt_classes),
                                     digest([s["image"], s["instances"].gt_masks])] for s in batch])
                yield batch
        return recorded()

    def train(self):
        start = state_digest(self.model_without_ddp)
        if self.world_size == 1:
            torch.save(self.model_without_ddp.state_dict(), os.path.join(self.output_dir, INITIAL_WEIGHTS))
        results = super().train()
        probe = {
            "rank": self.rank, "world_size": self.world_size, "package": mask2former.__file__,
            "backend": str(torch.distributed.get_backend()) if comm.is_dist_initialized() else None,
            "ddp": isinstance(self.model, torch.nn.parallel.DistributedDataParallel),
            "batch_norms": sorted({type(m).__name__ for m in self.model_without_ddp.modules()
                                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}),
            "batches": self.batches, "start": start, "final": state_digest(self.model_without_ddp),
        }
        with open(os.path.join(self.output_dir, f"probe.rank{self.rank}.json"), "w") as f:
            json.dump(probe, f)
        return results


# --------------------------------------------------------------------------- the tests
def run(nproc, *args, **env):
    """``python ARGS`` (1 process) or ``torchrun --nproc_per_node 2 ARGS`` from the repository root,
    one torch thread per process; returns the combined output, failing with its tail."""
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {"OMP_NUM_THREADS": "1", "M2F_DATASETS_YAML": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env}
    proc = run_python([*launch, *args], timeout=600, **env)
    assert proc.returncode == 0, f"{nproc} process(es) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same training in 1 process (no loader worker) and in 2 (one loader worker each): the
    two OUTPUT_DIRs."""
    root = tmp_path_factory.mktemp("datasets")
    synthetic.ensure_synthetic_dataset(str(root), splits={"train": 16})
    outs = {}
    for nproc, workers in ((1, "0"), (2, "1")):
        outs[nproc] = tmp_path_factory.mktemp(f"train{nproc}")
        run(nproc, __file__, "--config-file", CONFIG, *TRAIN_OPTS, "DATALOADER.NUM_WORKERS", workers,
            "OUTPUT_DIR", outs[nproc], DETECTRON2_DATASETS=str(root))
    return outs


def probes(out, world_size):
    return [json.loads((out / f"probe.rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.slow
def test_the_runs_are_one_process_and_two_ddp_processes(trained):
    """The premises: this checkout's package, DDP over a 2-process gloo group against a plain
    model, no BatchNorm (see (b))."""
    (one,), two = probes(trained[1], 1), probes(trained[2], 2)
    assert (one["world_size"], one["backend"], one["ddp"]) == (1, None, False)
    assert [(p["rank"], p["world_size"], p["backend"], p["ddp"]) for p in two] == [(0, 2, "gloo", True),
                                                                                  (1, 2, "gloo", True)]
    for p in [one, *two]:
        assert Path(p["package"]).resolve().is_relative_to(REPO) and p["batch_norms"] == []


@pytest.mark.slow
def test_both_runs_feed_the_same_augmented_samples_per_iteration(trained):
    """IMS_PER_BATCH 4 is the global batch: 1 process takes stream positions 4i..4i+3, rank r the
    positions 4i+r, 4i+r+2; each sample (image id, object count, augmented image and masks) is
    the same in both runs, whatever the rank and loader worker."""
    (one,), two = probes(trained[1], 1), probes(trained[2], 2)
    assert len(one["batches"]) == 3 and all(len(b) == 4 for b in one["batches"])
    for r, p in enumerate(two):
        assert p["batches"] == [b[r::2] for b in one["batches"]]
    # the ranks hold different numbers of objects in some iteration, so that (c) matters
    counts = [[sum(s[1] for s in b) for b in p["batches"]] for p in two]
    assert counts[0] != counts[1]


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one_process(trained):
    """Same start weights on every rank and in 1 process; the ranks end bitwise equal; each
    tensor's update over the 3 iterations agrees with 1 process to UPDATE_RTOL (see the module
    docstring: float32 summation order)."""
    (one,), two = probes(trained[1], 1), probes(trained[2], 2)
    assert one["start"] == two[0]["start"] == two[1]["start"]
    assert two[0]["final"] == two[1]["final"]
    start = torch.load(trained[1] / INITIAL_WEIGHTS, weights_only=True)
    (w1, meta1), (w2, meta2) = (read_checkpoint(str(trained[n] / "model_final.pth")) for n in (1, 2))
    assert (meta1["iteration"], meta1["world_size"], meta2["iteration"], meta2["world_size"]) == (2, 1, 2, 2)
    assert w1.keys() == w2.keys() == start.keys()
    moved, off = 0, {}
    for k, w0 in start.items():
        u1, u2 = (w1[k] - w0).double(), (w2[k] - w0).double()
        moved += bool(u1.norm() > 0)
        if (u1 - u2).norm() > UPDATE_RTOL * u1.norm():
            off[k] = float((u1 - u2).norm() / u1.norm())
    assert off == {}, f"updates differ by more than {UPDATE_RTOL} (relative): {off}"
    assert moved > len(start) // 2


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """``train_net.py --eval-only`` of the tiny panoptic parity model on ../shared/eval in 1 and in
    2 processes: their eval_results.json and logs."""
    eval_dir, parity = require_shared(EVAL), require_shared(PARITY)
    results = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"eval{nproc}")
        log = run(nproc, "train_net.py", "--eval-only", "--config-file", parity / "tiny_panoptic.yaml",
                  "MODEL.WEIGHTS", parity / "tiny_panoptic.pkl", "DATASETS.TEST", f'("{EVAL_DATASET}",)',
                  "MODEL.DEVICE", "cpu", "OUTPUT_DIR", out, DETECTRON2_DATASETS=str(eval_dir / "datasets"))
        results[nproc] = json.loads((out / "eval_results.json").read_text()), log
    return results


@pytest.mark.slow
def test_evaluation_gathered_over_two_processes_equals_one_process(evaluated):
    """The 5 images split 3 + 2 over the ranks; PQ, AP and mIoU (every key) are exactly those of
    1 process."""
    (one, _), (two, log) = evaluated[1], evaluated[2]
    assert "on 2 devices" in log
    assert set(one) == {"panoptic_seg", "segm", "sem_seg"}
    assert one["panoptic_seg"]["PQ"] > 0 and one["segm"]["AP"] > 0 and one["sem_seg"]["mIoU"] > 0
    assert two == one


if __name__ == "__main__":
    import train_net
    from mask2former.engine.defaults import default_argument_parser

    try:
        train_net.main(default_argument_parser().parse_args(), trainer_cls=ProbedTrainer)
    finally:
        if comm.is_dist_initialized():
            torch.distributed.destroy_process_group()
