"""kMaX-DeepLab's losses in 2 processes (gloo, CPU, DistributedDataParallel) against 1 process.

What the official criterion (bytedance/kmax-deeplab, kmax_deeplab/modeling/criterion.py and
matcher.py) does across processes: it all-reduces nothing (unlike Mask2Former's criterion, which
averages the number of masks over the processes). Every term is normalised per image, on the
process that holds the image: the PQ-style weights come from that image's own matching, the class,
mask-ID, instance-discrimination and semantic terms are a mean of the image's non-zero terms, the
dice term a sum over queries / Q; then each process takes the mean over its own images. DDP
averages gradients over the processes, and the trainer reports losses averaged over them, so with
equal per-process batches 2 processes x 1 image give the losses and gradients of 1 process x 2
images (asserted here within float tolerance; with unequal per-process batches they would not, in
the official code as in ours, and the training loader never makes them unequal).

The two sampled terms (pixel instance discrimination, auxiliary semantic) match the single
process only when every pixel is sampled (sample size >= pixels). With fewer, each process draws
from its own stream, as the official code does (its Gumbel noise comes from the global RNG, which
Detectron2 seeds with SEED + rank); here the criterion's generator is seeded with seed + rank, so
the ranks draw different pixels, and rank r's sampled terms are those of one process computing
image r with seed + r.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from mask2former.modeling import kmax_criterion as kc

B, Q, K, C0, C, S = 2, 5, 3, 4, 8, 6  # S x S pixels of the stride-4 output
ALL_PIXELS, FEW_PIXELS = 64, 16
SEED = 3
WEIGHTS = {"loss_ce": 3.0, "loss_mask": 0.3, "loss_dice": 3.0, "loss_pixel_insdis": 1.0, "loss_aux_semantic": 1.0}
SAMPLED = ("loss_pixel_insdis", "loss_pixel_insdis_0", "loss_aux_semantic")


class ToyHead(nn.Module):
    """Fixed per-image features (B, C0, S, S) -> the kMaX decoder's outputs, with one aux layer;
    no BatchNorm (its statistics are per process)."""

    def __init__(self):
        super().__init__()
        self.masks = nn.ModuleList(nn.Conv2d(C0, Q, 1) for _ in range(2))
        self.classes = nn.ModuleList(nn.Linear(C0, Q * (K + 1)) for _ in range(2))
        self.pixels = nn.Conv2d(C0, C, 1)
        self.semantic = nn.Conv2d(C0, K + 1, 1)

    def forward(self, x):
        feature = F.normalize(self.pixels(x), dim=1)
        layers = [{"pred_masks": m(x), "pred_logits": c(x.mean((2, 3))).view(len(x), Q, K + 1),
                   "pixel_feature": feature} for m, c in zip(self.masks, self.classes)]
        return {**layers[-1], "aux_outputs": layers[:-1], "aux_semantic_pred": self.semantic(x)}


def toy_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C0, S, S, generator=g)
    m0 = torch.zeros(3, S, S)
    m0[0, :, :2], m0[1, :3, 2:], m0[2, 3:, 2:5] = 1, 1, 1  # column 5 below row 3: void
    m1 = torch.zeros(2, S, S)
    m1[0, :4], m1[1, 4:] = 1, 1
    targets = [{"labels": torch.tensor([2, 0, 1]), "masks": m0}, {"labels": torch.tensor([1, 1]), "masks": m1}]
    torch.manual_seed(0)
    return ToyHead(), x, targets


def criterion(sample_k, seed=SEED):
    weights = dict(WEIGHTS)
    weights.update({f"{k}_0": v for k, v in WEIGHTS.items()})
    return kc.kMaXSetCriterion(K, weight_dict=weights, eos_coef=1e-5, losses=list(kc.kMaXSetCriterion.LOSSES),
                               pixel_insdis_sample_k=sample_k, aux_semantic_sample_k=sample_k, seed=seed)


def losses_and_grads(head, crit, x, targets):
    """The criterion's losses (detached) and the gradients of their weighted sum."""
    head.zero_grad()
    losses = crit(head(x), targets)
    sum(crit.weight_dict[k] * v for k, v in losses.items()).backward()
    module = head.module if isinstance(head, nn.parallel.DistributedDataParallel) else head
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad.clone() for n, p in module.named_parameters()})


def _worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=B)
    try:
        torch.set_num_threads(1)
        head, x, targets = toy_problem()
        ddp = nn.parallel.DistributedDataParallel(head)
        mine = x[rank:rank + 1], targets[rank:rank + 1]
        result = {k: losses_and_grads(ddp, criterion(k), *mine) for k in (ALL_PIXELS, FEW_PIXELS)}
        result["sample"] = kc.gumbel_topk(torch.zeros(1, S * S), FEW_PIXELS, criterion(FEW_PIXELS).generator("cpu"))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of 2 gloo processes computed on its image (see _worker)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("kmax_ddp")
    torch.multiprocessing.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=B, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(B)]


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_two_processes_give_the_full_batch_losses_and_gradients(ranks):
    """Every pixel sampled: the losses averaged over the ranks and DDP's gradients are those of
    the whole batch in one process."""
    head, x, targets = toy_problem()
    losses, grads = losses_and_grads(head, criterion(ALL_PIXELS), x, targets)
    assert set(SAMPLED) <= set(losses) and "loss_dice_0" in losses
    per_rank = [r[ALL_PIXELS] for r in ranks]
    assert_close({k: sum(r[0][k] for r in per_rank) / B for k in losses}, losses)
    for _, rank_grads in per_rank:
        assert_close(rank_grads, grads)
    # not trivially so: the two images' losses differ
    assert not torch.allclose(per_rank[0][0]["loss_ce"], per_rank[1][0]["loss_ce"])


@pytest.mark.slow
def test_each_process_samples_its_own_pixels(ranks):
    """Fewer pixels than the image has: the ranks draw different pixels on identical inputs;
    rank r's sampled terms are one process' on image r with seed + r; the unsampled terms still
    average to the full batch's."""
    assert not torch.equal(ranks[0]["sample"], ranks[1]["sample"])
    head, x, targets = toy_problem()
    full, _ = losses_and_grads(head, criterion(FEW_PIXELS), x, targets)
    for r in range(B):
        alone, _ = losses_and_grads(head, criterion(FEW_PIXELS, seed=SEED + r), x[r:r + 1], targets[r:r + 1])
        assert_close({k: ranks[r][FEW_PIXELS][0][k] for k in SAMPLED}, {k: alone[k] for k in SAMPLED})
    unsampled = [k for k in full if k not in SAMPLED]
    assert_close({k: sum(r[FEW_PIXELS][0][k] for r in ranks) / B for k in unsampled}, {k: full[k] for k in unsampled})
