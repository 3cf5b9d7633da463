"""Training losses: point sampling, Hungarian matcher, set criterion, and a tiny training run."""
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from mask2former.layers.point_features import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from mask2former.modeling.criterion import SetCriterion, build_criterion
from mask2former.modeling.matcher import HungarianMatcher
from tests.conftest import require_shared

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def bilinear(img, x, y):
    """img (H, W) read at normalised (x, y), align_corners=False, zeros outside."""
    h, w = img.shape
    fx, fy = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(fx), math.floor(fy)
    acc = 0.0
    for yy, wy in ((y0, y0 + 1 - fy), (y0 + 1, fy - y0)):
        for xx, wx in ((x0, x0 + 1 - fx), (x0 + 1, fx - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                acc += wy * wx * float(img[yy, xx])
    return acc


def pixel_centres(h, w):
    """(h*w, 2) (x, y) coordinates of every pixel centre, row-major."""
    ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) / h,
                            (torch.arange(w, dtype=torch.float64) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)


# ---- point features -------------------------------------------------------------------------
def test_point_sample_matches_direct_bilinear():
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, generator=g, dtype=torch.float64)
    coords[0, 0] = torch.tensor([0.0, 0.0])  # corners and edges: half the taps fall outside
    coords[0, 1] = torch.tensor([1.0, 0.5])
    out = point_sample(inp, coords)
    assert out.shape == (2, 3, 11)
    for n in range(2):
        for c in range(3):
            for p in range(11):
                want = bilinear(inp[n, c], float(coords[n, p, 0]), float(coords[n, p, 1]))
                assert out[n, c, p].item() == pytest.approx(want, abs=1e-12)


def test_point_sample_at_pixel_centres_reads_pixels():
    g = torch.Generator().manual_seed(1)
    inp = torch.randn(1, 2, 4, 6, generator=g, dtype=torch.float64)
    out = point_sample(inp, pixel_centres(4, 6)[None])
    torch.testing.assert_close(out, inp.flatten(2))


def test_calculate_uncertainty():
    x = torch.tensor([[[-3.0, 0.0, 0.5, 2.0]]])
    torch.testing.assert_close(calculate_uncertainty(x), torch.tensor([[[-3.0, 0.0, -0.5, -2.0]]]))
    with pytest.raises(ValueError, match="one channel"):
        calculate_uncertainty(torch.zeros(1, 2, 3))


def test_importance_sampling_keeps_the_most_uncertain_candidates():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 8, 8, generator=g) * 4
    num_points, ratio = 10, 4
    torch.manual_seed(123)
    candidates = torch.rand(3, num_points * ratio, 2)  # what the function draws first
    torch.manual_seed(123)
    chosen = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, num_points, ratio, 1.0)
    assert chosen.shape == (3, num_points, 2)
    unc = calculate_uncertainty(point_sample(logits, candidates))[:, 0]
    for n in range(3):
        top = candidates[n][unc[n].argsort(descending=True)[:num_points]]
        assert sorted(map(tuple, chosen[n].tolist())) == sorted(map(tuple, top.tolist()))
        # and every chosen point is at least as uncertain as every rejected candidate
        chosen_unc = calculate_uncertainty(point_sample(logits[n:n + 1], chosen[n:n + 1]))[0, 0]
        assert chosen_unc.min() >= unc[n].sort(descending=True).values[num_points] - 1e-6


def test_importance_sampling_mixes_in_uniform_points():
    logits = torch.randn(2, 1, 8, 8)
    torch.manual_seed(5)
    candidates = torch.rand(2, 30, 2)
    unc = calculate_uncertainty(point_sample(logits, candidates))[:, 0]
    torch.manual_seed(5)
    chosen = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 10, 3, 0.75)
    assert chosen.shape == (2, 10, 2)
    for n in range(2):  # int(0.75 * 10) = 7 importance-sampled, 3 uniform
        top = candidates[n][unc[n].argsort(descending=True)[:7]]
        assert sorted(map(tuple, chosen[n, :7].tolist())) == sorted(map(tuple, top.tolist()))
    assert ((chosen >= 0) & (chosen <= 1)).all()
    with pytest.raises(ValueError, match="oversample_ratio"):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 10, 0.5, 0.75)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 10, 3, 1.5)


# ---- matcher --------------------------------------------------------------------------------
def direct_cost(logits, pred_pts, labels, tgt_pts, wc, wm, wd):
    """(Q, T) cost by explicit per-pair loops."""
    prob = logits.softmax(-1)
    q, t = pred_pts.shape[0], tgt_pts.shape[0]
    c = torch.zeros(q, t, dtype=torch.float64)
    for i in range(q):
        for j in range(t):
            bce = F.binary_cross_entropy_with_logits(pred_pts[i], tgt_pts[j])
            s = pred_pts[i].sigmoid()
            dice = 1 - (2 * (s * tgt_pts[j]).sum() + 1) / (s.sum() + tgt_pts[j].sum() + 1)
            c[i, j] = -wc * prob[i, labels[j]] + wm * bce + wd * dice
    return c


def random_case(q, t, k, seed, pred_hw=(6, 6), tgt_hw=(6, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, q, k + 1, generator=g) * 2
    masks = torch.randn(1, q, *pred_hw, generator=g) * 3
    labels = torch.randint(0, k, (t,), generator=g)
    tgt = torch.rand(t, *tgt_hw, generator=g) > 0.5
    return {"pred_logits": logits, "pred_masks": masks}, [{"labels": labels, "masks": tgt}]


def test_matcher_cost_on_all_pixels_equals_full_mask_cost():
    outputs, targets = random_case(5, 3, 4, seed=0)
    m = HungarianMatcher(2.0, 5.0, 5.0, num_points=36)
    coords = pixel_centres(6, 6).float()
    cost = m.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"],
                         targets[0]["masks"], coords)
    want = direct_cost(outputs["pred_logits"][0].double(), outputs["pred_masks"][0].flatten(1).double(),
                       targets[0]["labels"], targets[0]["masks"].flatten(1).double(), 2.0, 5.0, 5.0)
    torch.testing.assert_close(cost.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q,t,seed", [(4, 1, 0), (4, 3, 1), (5, 5, 2), (6, 4, 3), (5, 2, 4)])
def test_matcher_equals_brute_force(q, t, seed):
    outputs, targets = random_case(q, t, 3, seed, pred_hw=(5, 5), tgt_hw=(10, 10))
    m = HungarianMatcher(2.0, 5.0, 5.0, num_points=50)
    torch.manual_seed(seed)
    coords = torch.rand(50, 2)
    m.sample_points = lambda device: coords
    (rows, cols), = m(outputs, targets)
    assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == t
    assert len(set(rows.tolist())) == t and sorted(cols.tolist()) == list(range(t))
    cost = m.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"],
                         targets[0]["masks"], coords)
    best = min(itertools.permutations(range(q), t), key=lambda p: sum(float(cost[p[j], j]) for j in range(t)))
    got = dict(zip(cols.tolist(), rows.tolist()))
    assert [got[j] for j in range(t)] == list(best)


def test_matcher_prefers_the_obviously_right_query():
    # query 2 predicts class 1 with the exact target mask; the others are confident background
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, :, 2] = 5.0
    logits[0, 2] = torch.tensor([-5.0, 5.0, -5.0])
    tgt = torch.zeros(1, 8, 8, dtype=torch.bool)
    tgt[0, 2:6, 1:7] = True
    masks = torch.full((1, 4, 8, 8), -6.0)
    masks[0, 2][tgt[0]] = 6.0
    (rows, cols), = HungarianMatcher(2, 5, 5, num_points=200)({"pred_logits": logits, "pred_masks": masks},
                                                              [{"labels": torch.tensor([1]), "masks": tgt}])
    assert rows.tolist() == [2] and cols.tolist() == [0]


def test_matcher_handles_images_without_targets_and_checks_counts():
    outputs, targets = random_case(4, 2, 3, seed=0)
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 6, 6, dtype=torch.bool)},
               targets[0]]
    m = HungarianMatcher(1, 1, 1, num_points=20)
    (r0, c0), (r1, c1) = m(outputs, targets)
    assert r0.numel() == c0.numel() == 0 and r0.dtype == torch.int64
    assert len(r1) == len(c1) == 2
    too_many = [{"labels": torch.zeros(5, dtype=torch.int64), "masks": torch.zeros(5, 6, 6)}] * 2
    with pytest.raises(ValueError, match="only 4 queries"):
        m(outputs, too_many)
    with pytest.raises(ValueError, match="all be 0"):
        HungarianMatcher(0, 0, 0)


def test_matcher_is_float32_and_gradient_free_under_autocast():
    outputs, targets = random_case(5, 3, 3, seed=7)
    outputs["pred_masks"].requires_grad_(True)
    m = HungarianMatcher(2, 5, 5, num_points=30)
    coords = torch.rand(30, 2)
    seen = []
    orig = m.cost_matrix

    def spy(*a):
        c = orig(*a)
        seen.append((c.dtype, c.requires_grad))
        return c
    m.cost_matrix = spy
    m.sample_points = lambda device: coords
    low = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(low, targets)
    want = m({k: v.float() for k, v in low.items()}, targets)
    assert seen == [(torch.float32, False)] * 2
    assert [r.tolist() for r, _ in got] == [r.tolist() for r, _ in want]


# ---- criterion ------------------------------------------------------------------------------
def make_criterion(num_classes=3, eos=0.1, dense=False, num_points=4, coords=None, match_coords=None):
    weight_dict = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    c = SetCriterion(num_classes, weight_dict=weight_dict, eos_coef=eos, num_points=num_points,
                     oversample_ratio=3.0, importance_sample_ratio=0.75, dense=dense)
    if coords is not None:  # fixed loss points (same for every matched mask)
        c.sample_points = lambda src: coords.to(src.dtype)[None].expand(src.shape[0], -1, -1)
    if match_coords is not None:
        c.matcher.sample_points = lambda device: match_coords
    return c


def tiny_case():
    """2 queries, 1 target of class 1 (K = 3): query 1 is the right one."""
    logits = torch.tensor([[[0.2, -0.3, 0.1, 1.5], [0.4, 2.0, -1.0, 0.3]]])
    masks = torch.tensor([[[[-2.0, 1.0], [0.5, -1.5]], [[3.0, -2.5], [1.5, -0.5]]]])
    tgt = torch.zeros(1, 4, 4, dtype=torch.bool)
    tgt[0, :, :2] = True  # left half
    return {"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.tensor([1]), "masks": tgt}]


def test_criterion_terms_match_hand_computation():
    outputs, targets = tiny_case()
    coords = pixel_centres(2, 2).float()  # the 4 centres of the 2x2 prediction grid
    crit = make_criterion(coords=coords, match_coords=coords)
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}

    def nll(row, k):
        return math.log(sum(math.exp(v) for v in row)) - row[k]
    lg = outputs["pred_logits"][0].tolist()
    # query 1 matched to class 1 (weight 1); query 0 is "no object" = index 3 (weight 0.1)
    ce = (1.0 * nll(lg[1], 1) + 0.1 * nll(lg[0], 3)) / (1.0 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-6)

    x = [3.0, -2.5, 1.5, -0.5]  # query 1's logits at the points, row-major
    y = [1.0, 0.0, 1.0, 0.0]    # the target's left half read at those points
    bce = sum(math.log1p(math.exp(-xi)) if yi else math.log1p(math.exp(xi)) for xi, yi in zip(x, y)) / 4
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=1e-6)  # num_masks = 1
    s = [1 / (1 + math.exp(-xi)) for xi in x]
    dice = 1 - (2 * sum(si * yi for si, yi in zip(s, y)) + 1) / (sum(s) + sum(y) + 1)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-6)


def test_criterion_normalises_by_the_number_of_masks_and_handles_empty_images():
    outputs, targets = tiny_case()
    coords = pixel_centres(2, 2).float()
    one = make_criterion(coords=coords, match_coords=coords)(outputs, targets)
    # image 2 repeats image 1: mask losses sum over 2 masks / num_masks 2 = the same value
    two = make_criterion(coords=coords, match_coords=coords)(
        {k: torch.cat([v, v]) for k, v in outputs.items()}, targets * 2)
    for k in one:
        assert two[k].item() == pytest.approx(one[k].item(), rel=1e-6)
    # an image without targets: every query is "no object", mask losses 0 but still differentiable
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)}]
    masks = outputs["pred_masks"].clone().requires_grad_(True)
    losses = make_criterion(coords=coords)({"pred_logits": outputs["pred_logits"], "pred_masks": masks}, empty)
    lg = outputs["pred_logits"][0]
    assert losses["loss_ce"].item() == pytest.approx(F.cross_entropy(lg, torch.tensor([3, 3])).item(), rel=1e-6)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert masks.grad is not None


def test_criterion_point_loss_equals_dense_loss_when_points_cover_every_pixel():
    g = torch.Generator().manual_seed(3)
    outputs = {"pred_logits": torch.randn(2, 5, 4, generator=g), "pred_masks": torch.randn(2, 5, 8, 8, generator=g)}
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 8, 8, generator=g) > 0.5},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, 8, 8, generator=g) > 0.5}]
    coords = pixel_centres(8, 8).float()
    point = make_criterion(num_points=64, coords=coords, match_coords=coords)(outputs, targets)
    dense = make_criterion(dense=True, match_coords=coords)(outputs, targets)
    for k in point:
        assert point[k].item() == pytest.approx(dense[k].item(), rel=1e-5)


def test_criterion_point_losses_never_touch_full_resolution():
    """The loss reads the 1/4-resolution predictions at points: no tensor of the target size is
    built from the predictions (checked by forbidding F.interpolate)."""
    outputs, targets = random_case(6, 3, 3, seed=4, pred_hw=(4, 4), tgt_hw=(16, 16))
    crit = make_criterion(num_points=20)
    import mask2former.modeling.criterion as cm
    orig = cm.F.interpolate
    cm.F.interpolate = lambda *a, **k: (_ for _ in ()).throw(AssertionError("interpolate called"))
    try:
        losses = crit(outputs, targets)
    finally:
        cm.F.interpolate = orig
    assert all(torch.isfinite(v) for v in losses.values())


def test_criterion_deep_supervision_keys_and_values():
    outputs, targets = tiny_case()
    coords = pixel_centres(2, 2).float()
    aux = [{"pred_logits": outputs["pred_logits"].clone(), "pred_masks": outputs["pred_masks"].clone()}
           for _ in range(3)]
    losses = make_criterion(coords=coords, match_coords=coords)(dict(outputs, aux_outputs=aux), targets)
    names = ("loss_ce", "loss_mask", "loss_dice")
    assert set(losses) == set(names) | {f"{n}_{i}" for n in names for i in range(3)}
    for n in names:
        for i in range(3):
            assert losses[f"{n}_{i}"].item() == pytest.approx(losses[n].item(), rel=1e-6)


def test_criterion_gradients_and_checks():
    outputs, targets = random_case(5, 2, 3, seed=9, pred_hw=(4, 4), tgt_hw=(16, 16))
    for v in outputs.values():
        v.requires_grad_(True)
    losses = make_criterion(num_points=16)(outputs, targets)
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and outputs["pred_masks"].grad.abs().sum() > 0
    crit = make_criterion()
    with pytest.raises(ValueError, match="labels"):
        crit(outputs, [{"labels": torch.tensor([3, 0]), "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match="expected a list of 1"):
        crit(outputs, targets * 2)


def test_build_criterion_uses_the_config():
    import mask2former as m2f

    cfg = m2f.get_cfg()
    mf = cfg.MODEL.MASK_FORMER
    mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.TRAIN_NUM_POINTS = 2.0, 5.0, 4.0, 321
    mf.DEC_LAYERS, mf.DEEP_SUPERVISION = 3, True
    crit = build_criterion(cfg, 7)
    assert (crit.matcher.cost_class, crit.matcher.cost_mask, crit.matcher.cost_dice) == (2.0, 5.0, 4.0)
    assert crit.matcher.num_points == crit.num_points == 321
    assert crit.weight_dict["loss_dice_1"] == 4.0 and "loss_ce_2" not in crit.weight_dict
    assert crit.empty_weight.shape == (8,) and not crit.dense
    assert list(crit.state_dict()) == ["empty_weight"]


def test_num_masks_is_averaged_over_workers(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    crit = make_criterion()
    targets = [{"labels": torch.zeros(3, dtype=torch.int64)}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert crit.num_masks(targets, torch.device("cpu")) == 3.0
        assert crit.num_masks(targets[1:], torch.device("cpu")) == 1.0  # clamped
    finally:
        dist.destroy_process_group()


# ---- model training path --------------------------------------------------------------------
def tiny_model(num_points=64):
    cfg_path = SHARED / "parity" / "tiny_panoptic.yaml"
    require_shared(cfg_path)
    import mask2former as m2f

    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(cfg_path))
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = num_points
    torch.manual_seed(0)
    return m2f.build_model(cfg, load_weights=False).train()


def synthetic_sample(seed, h=64, w=64):
    from mask2former.structures import Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 40, (3, h, w), generator=g, dtype=torch.uint8)
    boxes = [(4, 4, 28, 30), (34, 8, 60, 50), (8, 38, 24, 60)]
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for m, (y0, x0, y1, x1), v in zip(masks, boxes, (90, 170, 250)):
        m[y0:y1, x0:x1] = True
        image[:, m] = v
    return {"image": image, "instances": Instances((h, w), gt_classes=torch.tensor([1, 5, 7]), gt_masks=masks)}


def test_prepare_targets_pads_masks_and_checks_sizes():
    model = tiny_model()
    a, b = synthetic_sample(0), synthetic_sample(1, h=40, w=50)
    targets = model.prepare_targets([a["instances"], b["instances"]], (64, 64), [(64, 64), (40, 50)])
    assert targets[1]["masks"].shape == (3, 64, 64) and targets[1]["labels"].dtype == torch.int64
    assert torch.equal(targets[1]["masks"][:, :40, :50], b["instances"].gt_masks)
    assert not targets[1]["masks"][:, 40:].any() and not targets[1]["masks"][:, :, 50:].any()
    bad = dict(a, image=a["image"][:, :48])
    with pytest.raises(ValueError, match=r"gt_masks are 64x64 but the image is 48x64"):
        model([bad])


def test_tiny_training_run_decreases_the_loss():
    torch.manual_seed(0)
    model = tiny_model(num_points=64)
    batch = [synthetic_sample(0), synthetic_sample(1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    history = []
    for _ in range(25):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert set(losses) == set(model.criterion.weight_dict) and len(losses) == 3 * 4  # DEC_LAYERS 4
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.85 * first, history


def test_model_weights_the_losses_and_drops_unweighted_ones():
    model = tiny_model()
    seen = {}

    def fake_criterion(outputs, targets):
        seen["targets"] = targets
        return {"loss_ce": torch.tensor(1.0), "loss_mask_0": torch.tensor(3.0), "loss_extra": torch.tensor(7.0)}
    model.criterion.forward = fake_criterion
    losses = model([synthetic_sample(0)])
    assert losses == {"loss_ce": torch.tensor(2.0), "loss_mask_0": torch.tensor(15.0)}
    assert seen["targets"][0]["labels"].tolist() == [1, 5, 7]
