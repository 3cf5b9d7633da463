"""MP-Former's mask-piloted training against the official semantics (IDEA-Research/MP-Former:
MultiScaleMaskedTransformerDecoderMaskDN with prepare_for_dn_v5 / gen_mask_dn for "points" and
prepare_for_dn_v6 for "shift", and SetCriterion's "_dn" losses): the MP query layout and
self-attention mask, the attention masks every layer reads, the noise rates, the direct-assignment
losses. The model-level checks (NUM_DN 0 and inference equal to Mask2Former, checkpoints, configs,
training) are in test_mp_former_model.py.

The decoder here is tiny: 32 channels, 4 heads, 4 matching queries, 5 layers, feature maps of
4x4, 8x8 and 16x16 and mask features of 32x32 for 128x128 ground-truth masks, so the levels are
exact 32, 16 and 8 pixel cells of the masks."""
import math

import pytest
import torch
from torch.nn import functional as F

from mask2former.modeling.criterion import SetCriterion
from mask2former.modeling.transformer_decoder.mask_piloting import (
    label_noise,
    level_masks_for_shift,
    mask_boxes,
    mp_layout,
    point_noise,
    self_attention_mask,
)
from mask2former.modeling.transformer_decoder.mp_former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoderMaskDN,
)

LEVELS = (4, 8, 16)  # the side of the feature map layer j reads: LEVELS[j % 3]
QUERIES = 4


def make_decoder(**kw):
    torch.manual_seed(0)
    args = dict(num_classes=5, hidden_dim=32, num_queries=QUERIES, nheads=4, dim_feedforward=64, dec_layers=5,
                pre_norm=False, mask_dim=32, enforce_input_project=False, num_dn=2, noise_scale=0.0,
                dn_mode="points", head_dn=False, all_layers_dn=True, label_noise_ratio=0.2)
    args.update(kw)
    return MultiScaleMaskedTransformerDecoderMaskDN(32, **args).train()


def decoder_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 32, s, s, generator=g) for s in LEVELS], torch.randn(2, 32, 32, 32, generator=g)


def gt_targets(size=128):
    """Image 0: a rectangle across cell borders, an L, a single pixel; image 1: a tall rectangle."""
    a = torch.zeros(3, size, size, dtype=torch.bool)
    a[0, 10:50, 20:90] = True
    a[1, 60:120, 5:30] = True
    a[1, 100:120, 5:100] = True
    a[2, 70, 45] = True
    b = torch.zeros(1, size, size, dtype=torch.bool)
    b[0, 33:97, 40:72] = True
    return [{"labels": torch.tensor([1, 4, 2]), "masks": a, "image_size": (size, size)},
            {"labels": torch.tensor([3]), "masks": b, "image_size": (size, size)}]


def cells_any(masks, s):
    """(T, H, W) -> (T, s*s): a cell is foreground iff any of its pixels is (area resizing > 0)."""
    t, h, w = masks.shape
    return masks.view(t, s, h // s, s, w // s).any(4).any(2).flatten(1)


def cells_nearest(masks, s):
    """(T, H, W) -> (T, s*s): nearest resizing by an integer factor reads each cell's first pixel."""
    k = masks.shape[-1] // s
    return masks[:, ::k, ::k].flatten(1)


def everywhere_if_empty(blocked):
    """A row that would attend to nothing attends everywhere (True = not attended)."""
    blocked = blocked.clone()
    blocked[blocked.all(-1)] = False
    return blocked


def predicted_blocked(mask_logits, s):
    """Mask2Former's attention mask from predicted mask logits (Q, H', W') at s x s."""
    resized = F.interpolate(mask_logits[None], size=(s, s), mode="bilinear", align_corners=False)[0]
    return everywhere_if_empty(resized.sigmoid().flatten(1) < 0.5)


def capture_memory_masks(decoder):
    """The memory_mask each cross-attention layer is called with, in order."""
    seen = []
    for layer in decoder.transformer_cross_attention_layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["memory_mask"].clone()),
                                        with_kwargs=True)
    return seen


# ---- layout and self-attention mask -------------------------------------------------------------
def test_self_attention_mask_layout():
    layout = mp_layout([3, 1], 2)
    assert (layout.num_groups, layout.group_size, layout.pad_size) == (2, 3, 6)
    # group-major, then image-major: slot t of group g holds object t of every image that has one
    assert layout.batch_index.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    assert layout.slot_index.tolist() == [0, 1, 2, 0, 3, 4, 5, 3]
    assert layout.object_index.tolist() == [0, 1, 2, 0, 0, 1, 2, 0]
    assert [(s.tolist(), o.tolist()) for s, o in layout.matches([3, 1])] == [
        ([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]), ([0, 3], [0, 0])]
    # 2 groups of 3 MP slots, then 2 matching queries; 1 = not attended
    want = ["00011100",
            "00011100",
            "00011100",
            "11100000",
            "11100000",
            "11100000",
            "11111100",
            "11111100"]
    got = self_attention_mask(layout, 2)
    assert got.dtype == torch.bool
    assert ["".join(str(int(v)) for v in row) for row in got.tolist()] == want


def test_layout_budget_and_nothing_to_pilot():
    # NUM_DN >= 100 is a budget of MP queries: NUM_DN // (most objects of an image) groups
    assert mp_layout([3, 1], 100).num_groups == 33 and mp_layout([3, 1], 100).pad_size == 99
    assert mp_layout([4, 7], 150).num_groups == 21
    assert mp_layout([3, 1], 99).num_groups == 99
    for num_objects, num_dn in (([0, 0], 5), ([], 5), ([3, 1], 0), ([200], 100)):
        assert mp_layout(num_objects, num_dn) is None


# ---- the attention masks each layer reads ---------------------------------------------------------
@pytest.mark.parametrize("mode,resize", [("points", cells_any), ("shift", cells_nearest)])
@pytest.mark.parametrize("all_layers", [True, False])
def test_mp_attention_masks_are_the_ground_truth_at_each_level(mode, resize, all_layers):
    """NOISE_SCALE 0: the MP slots of layer j read their object's mask at layer j's level (points:
    area resizing, shift: nearest) in every layer with ALL_LY_DN, else iff j <= 3 (the official
    flag i < 3 on the prediction after layer i, which layer i + 1 reads); padding slots attend
    everywhere; matching queries read their own predicted masks, as in Mask2Former."""
    dec = make_decoder(dn_mode=mode, all_layers_dn=all_layers)
    x, mask_features = decoder_inputs()
    targets = gt_targets()
    seen = capture_memory_masks(dec)
    out = dec(x, mask_features, targets=targets)
    p = out["dn_out"]["layout"].pad_size
    assert p == 6 and len(seen) == 5
    for j, memory_mask in enumerate(seen):
        s = LEVELS[j % 3]
        heads = memory_mask.view(2, dec.num_heads, p + QUERIES, s * s)
        assert torch.equal(heads, heads[:, :1].expand_as(heads)), "without HEAD_DN every head reads the same"
        for b, target in enumerate(targets):
            got = heads[b, 0]
            assert torch.equal(got[p:], predicted_blocked(out["aux_outputs"][j]["pred_masks"][b], s))
            if all_layers or j <= 3:
                gt = everywhere_if_empty(~resize(target["masks"], s))
                want = torch.zeros(p, s * s, dtype=torch.bool)
                want[: len(gt)] = gt
                want[3: 3 + len(gt)] = gt
            else:
                want = predicted_blocked(out["dn_out"]["aux_outputs"][j]["pred_masks"][b], s)
            assert torch.equal(got[:p], want), (j, b)


def test_point_noise_in_the_decoder_is_fresh_per_layer_and_per_head_with_head_dn():
    x, mask_features = decoder_inputs()
    for head_dn in (False, True):
        dec = make_decoder(noise_scale=1.0, head_dn=head_dn)
        seen = capture_memory_masks(dec)
        dec(x, mask_features, targets=gt_targets())
        views = [m.view(2, dec.num_heads, 6 + QUERIES, -1) for m in seen]
        for m in views:
            assert torch.equal(m[:, :, 6:], m[:, :1, 6:].expand_as(m[:, :, 6:]))  # matching queries
            assert all(torch.equal(m[:, h, :6], m[:, 0, :6]) for h in range(4)) == (not head_dn)
        # layers 2 and 5 would share a level; 0 and 3 do: fresh noise in each layer
        assert not torch.equal(views[0][:, :, :6], views[3][:, :, :6])


def test_mp_queries_leave_the_matching_queries_outputs_unchanged():
    """Matching queries see no MP query, so their outputs with MP training equal those without."""
    dec = make_decoder(noise_scale=0.3, head_dn=True)
    x, mask_features = decoder_inputs()
    with_mp = dec(x, mask_features, targets=gt_targets())
    without = dec(x, mask_features)
    assert "dn_out" in with_mp and "dn_out" not in without
    pairs = [(with_mp, without)] + list(zip(with_mp["aux_outputs"], without["aux_outputs"]))
    for a, b in pairs:
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


# ---- noise ------------------------------------------------------------------------------------
def within(count, n, p, sigmas=5.0):
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def test_point_noise_flip_rate_is_noise_scale_times_area_over_size():
    """Every pixel of a mask (foreground or not) flips with probability s * area / (h*w)."""
    torch.manual_seed(0)
    hw, copies, scale = 400, 500, 0.6
    areas = (0, 20, 100, 250, 400)
    masks = torch.ones(len(areas), copies, hw, dtype=torch.bool)  # True = not attended
    for i, a in enumerate(areas):
        masks[i, :, :a] = False
    flips = point_noise(masks, scale) ^ masks
    for i, a in enumerate(areas):
        p = scale * a / hw
        assert within(int(flips[i].sum()), copies * hw, p), (a, flips[i].float().mean().item(), p)
        if 0 < a < hw:  # foreground and background alike
            assert within(int(flips[i, :, :a].sum()), copies * a, p)
            assert within(int(flips[i, :, a:].sum()), copies * (hw - a), p)
    assert torch.equal(point_noise(masks, 0.0), masks)


def test_point_noise_per_head_is_independent():
    torch.manual_seed(1)
    hw, heads = 256, 8
    mask = torch.ones(hw, dtype=torch.bool)
    mask[:64] = False
    masks = mask.repeat(200, heads, 1)  # (M, heads, hw), the same mask for every head
    flips = point_noise(masks, 0.5) ^ masks
    for h in range(heads):
        assert within(int(flips[:, h].sum()), 200 * hw, 0.5 * 64 / hw)
        assert h == 0 or not torch.equal(flips[:, h], flips[:, 0])


def test_label_noise_rate():
    """Each label is redrawn from [0, K) with probability r (possibly itself): (K - 1) / K of
    those change, uniformly to the other classes."""
    torch.manual_seed(0)
    k, r, n = 5, 0.2, 200_000
    labels = torch.full((n,), 2)
    noised = label_noise(labels, r, k)
    changed = noised != labels
    assert within(int(changed.sum()), n, r * (k - 1) / k)
    counts = torch.bincount(noised, minlength=k)
    assert int(noised.min()) >= 0 and int(noised.max()) < k
    assert all(within(int(counts[c]), int(changed.sum()), 1 / (k - 1)) for c in (0, 1, 3, 4))
    for ratio in (0.0, -1.0):
        assert torch.equal(label_noise(labels, ratio, k), labels)


def test_mp_query_content_is_the_class_embedding():
    targets = gt_targets()
    layout = mp_layout([3, 1], 2)
    dec = make_decoder(label_noise_ratio=-1.0)
    queries = dec.mp_queries(targets, layout, 2)  # (P, N, C)
    emb = dec.label_enc.weight
    for slot, image, label in ((0, 0, 1), (1, 0, 4), (2, 0, 2), (3, 0, 1), (4, 0, 4), (5, 0, 2), (0, 1, 3), (3, 1, 3)):
        assert torch.equal(queries[slot, image], emb[label])
    assert not queries[[1, 2, 4, 5], 1].any()  # padding
    # shift mode without label noise: each embedding scaled elementwise by 1 + U(-s, s)
    dec = make_decoder(dn_mode="shift", noise_scale=0.5, label_noise_ratio=-1.0)
    queries = dec.mp_queries(targets, layout, 2)
    ratio = queries[0, 0] / dec.label_enc.weight[1]
    assert ratio.min() >= 0.5 - 1e-6 and ratio.max() <= 1.5 + 1e-6 and ratio.std() > 0.1


# ---- shift mode -------------------------------------------------------------------------------
def test_mask_boxes_are_bitmask_boxes_normalised_by_the_image_size():
    m = torch.zeros(2, 20, 40, dtype=torch.bool)
    m[0, 5:10, 8:20] = True
    boxes = mask_boxes(m, (20, 40))
    torch.testing.assert_close(boxes[0], torch.tensor([14 / 40, 7.5 / 20, 12 / 40, 5 / 20]))
    assert not boxes[1].any()


def test_shift_noise_0_gives_the_nearest_resized_ground_truth():
    targets = gt_targets()
    levels = level_masks_for_shift(targets, [(s, s) for s in LEVELS], 2, 0.0)
    for got, s in zip(levels, LEVELS):
        assert torch.equal(got, torch.cat([~cells_nearest(t["masks"], s) for t in targets]).repeat(2, 1))


def translate(mask, dy, dx):
    """The foreground of ``mask`` (h, w) moved by (dy, dx), pixels pushed out clamped to the border."""
    h, w = mask.shape
    ys, xs = torch.where(mask)
    out = torch.zeros_like(mask)
    out[(ys + dy).clamp(0, h - 1), (xs + dx).clamp(0, w - 1)] = True
    return out


def test_shift_noise_translates_each_mask_within_the_documented_bound():
    """At the finest level each MP mask is its ground truth moved by a random offset: rows by up
    to noise * box width / 2 * w, columns by up to noise * box height / 2 * w (the official
    order); coarser levels are nearest-resized from it."""
    torch.manual_seed(0)
    targets, repeat, noise, s = gt_targets(), 12, 0.8, LEVELS[-1]
    levels = level_masks_for_shift(targets, [(v, v) for v in LEVELS], repeat, noise)
    gt = torch.cat([cells_nearest(t["masks"], s) for t in targets]).repeat(repeat, 1).view(-1, s, s)
    boxes = torch.cat([mask_boxes(t["masks"], t["image_size"]) for t in targets]).repeat(repeat, 1)
    got = ~levels[-1].view(-1, s, s)
    offsets = set()
    for m in range(len(gt)):
        by, bx = (noise * boxes[m, 2:] / 2 * s).tolist()  # rows: width, columns: height
        found = [(dy, dx) for dy in range(math.floor(-by), math.floor(by) + 1)
                 for dx in range(math.floor(-bx), math.floor(bx) + 1) if torch.equal(translate(gt[m], dy, dx), got[m])]
        assert found, f"mask {m} is no translate of its ground truth within ({by:.2f}, {bx:.2f})"
        if gt[m].any():
            offsets.add(found[0])
    assert len(offsets) > 5
    for level, v in zip(levels[:-1], LEVELS[:-1]):
        assert torch.equal(level, ~cells_nearest(got, v))


# ---- direct-assignment losses -------------------------------------------------------------------
def test_direct_assignment_losses_equal_a_hand_computation():
    """K = 3, 2 MP groups over images with 2 and 1 objects (4 slots; image 1's slots 1 and 3 are
    padding). Dense criterion at the prediction's own size: the mask terms are plain per-pixel sums."""
    k, n, h = 3, 2, 4
    g = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.tensor([2, 0]), "masks": torch.rand(2, h, h, generator=g) > 0.5},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, h, h, generator=g) > 0.5}]

    def layer(q):
        return {"pred_logits": torch.randn(n, q, k + 1, generator=g),
                "pred_masks": torch.randn(n, q, h, h, generator=g)}
    dn = {**layer(4), "aux_outputs": [layer(4)], "layout": mp_layout([2, 1], 2)}
    outputs = {**layer(3), "aux_outputs": [layer(3)], "dn_out": dn}
    crit = SetCriterion(k, weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}, eos_coef=0.1,
                        num_points=16, oversample_ratio=3.0, importance_sample_ratio=0.75, dense=True, mp_losses=True)
    losses = crit(outputs, targets)
    names = ("loss_ce", "loss_mask", "loss_dice")
    assert set(losses) == {f"{a}{b}" for a in names for b in ("", "_0", "_dn", "_dn_0")}
    assign = {(0, 0): 0, (0, 1): 1, (0, 2): 0, (0, 3): 1, (1, 0): 0, (1, 2): 0}  # (image, slot) -> object

    def by_hand(layer):
        logits, masks = layer["pred_logits"].double(), layer["pred_masks"].double()
        ce_sum = weight_sum = bce = dice = 0.0
        for b in range(n):
            for slot in range(4):
                obj = assign.get((b, slot))
                cls = k if obj is None else int(targets[b]["labels"][obj])
                w = 0.1 if cls == k else 1.0
                ce_sum += w * (torch.logsumexp(logits[b, slot], 0) - logits[b, slot, cls])
                weight_sum += w
                if obj is None:
                    continue
                x, y = masks[b, slot].flatten(), targets[b]["masks"][obj].double().flatten()
                bce += (torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0) - x * y).mean()
                dice += 1 - (2 * (x.sigmoid() * y).sum() + 1) / (x.sigmoid().sum() + y.sum() + 1)
        norm = 3 * 2  # objects in the batch x MP groups
        return ce_sum / weight_sum, bce / norm, dice / norm

    for suffix, lay in (("_dn", dn), ("_dn_0", dn["aux_outputs"][0])):
        for name, want in zip(names, by_hand(lay)):
            assert losses[name + suffix].item() == pytest.approx(want.item(), rel=1e-5), name + suffix


def test_no_object_in_the_batch_gives_zero_mp_losses_under_the_same_names():
    g = torch.Generator().manual_seed(0)

    def layer():
        return {"pred_logits": torch.randn(2, 3, 4, generator=g), "pred_masks": torch.randn(2, 3, 4, 4, generator=g)}
    outputs = {**layer(), "aux_outputs": [layer(), layer()]}
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)}] * 2
    crit = SetCriterion(3, weight_dict={}, eos_coef=0.1, num_points=16, oversample_ratio=3.0,
                        importance_sample_ratio=0.75, mp_losses=True)
    losses = crit(outputs, empty)
    dn = {f"{a}_dn{b}" for a in ("loss_ce", "loss_mask", "loss_dice") for b in ("", "_0", "_1")}
    assert dn <= set(losses) and all(losses[name].item() == 0 for name in dn)
