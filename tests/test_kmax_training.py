"""kMaX-DeepLab training: every loss term against a naive computation on a toy batch, the matcher
against brute force, the pixel sampling's reproducibility, and the model's training forward."""
import itertools
import math

import pytest
import torch

import mask2former as m2f
from mask2former.modeling import kmax_criterion as kc
from mask2former.structures import Instances
from tests.test_kmax_layers import tiny_cfg

B, Q, K, H, W = 2, 4, 3, 3, 4


@pytest.fixture()
def toy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, Q, K + 1, generator=g)
    mask_logits = torch.randn(B, Q, H, W, generator=g)
    # image 0: two segments and void pixels; image 1: three segments covering everything
    m0 = torch.zeros(2, H, W)
    m0[0, :, :2] = 1
    m0[1, :2, 2:] = 1
    m1 = torch.zeros(3, H, W)
    m1[0, 0] = 1
    m1[1, 1:, :2] = 1
    m1[2, 1:, 2:] = 1
    targets = [{"labels": torch.tensor([2, 0]), "masks": m0}, {"labels": torch.tensor([1, 1, 2]), "masks": m1}]
    return logits, mask_logits, targets


def naive_mean_of_nonzero(per_image):
    return sum(sum(v) / max(1, sum(1 for x in v if x != 0)) for v in per_image) / len(per_image)


def test_class_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, Q, K + 1, generator=g)
    classes = torch.tensor([[0, 3, 2, 3], [1, 1, 3, 0]])
    weight = torch.rand(B, Q, generator=g)
    per_image = []
    for b in range(B):
        row = []
        for q in range(Q):
            c = int(classes[b, q])
            p = math.exp(logits[b, q, c]) / sum(math.exp(x) for x in logits[b, q].tolist())
            row.append(-math.log(p) * (0.25 if c == K else 0.75) * float(weight[b, q]))
        per_image.append(row)
    assert kc.class_loss(logits, classes, weight).item() == pytest.approx(naive_mean_of_nonzero(per_image), rel=1e-5)


def test_mask_id_and_dice_losses_by_hand():
    g = torch.Generator().manual_seed(2)
    mask_logits = torch.randn(B, Q, H * W, generator=g)
    target = torch.zeros(B, Q, H * W)
    target[0, 1, :5] = 1
    target[0, 2, 5:9] = 1  # pixels 9.. of image 0 are void
    target[1, 0, :] = 0.5
    target[1, 3, :] = 0.5  # two overlapping masks share every pixel
    void = target.sum(1) < 1
    weight = torch.rand(B, Q, generator=g)
    ce_per_image, dice_total = [], 0.0
    for b in range(B):
        row = []
        for p in range(H * W):
            if void[b, p]:
                continue
            z = [float(mask_logits[b, q, p]) for q in range(Q)]
            lse = math.log(sum(math.exp(x) for x in z))
            row.append(-sum(float(target[b, q, p]) * (z[q] - lse) for q in range(Q)))
        ce_per_image.append(row)
        for q in range(Q):
            probs = [0.0 if void[b, p] else math.exp(mask_logits[b, q, p]) / sum(
                math.exp(mask_logits[b, j, p]) for j in range(Q)) for p in range(H * W)]
            t = target[b, q].tolist()
            dice = (2 * sum(a * c for a, c in zip(probs, t)) + 1) / (sum(probs) + sum(t) + 1)
            dice_total += (1 - dice) * float(weight[b, q]) * 0.75 / Q
    assert kc.mask_id_loss(mask_logits, target, void).item() == pytest.approx(naive_mean_of_nonzero(ce_per_image),
                                                                             rel=1e-5)
    assert kc.dice_loss(mask_logits, target, void, weight).item() == pytest.approx(dice_total / B, rel=1e-5)


def test_pixel_insdis_loss_by_hand():
    g = torch.Generator().manual_seed(3)
    feature = torch.nn.functional.normalize(torch.randn(B, 5, H * W, generator=g), dim=1)
    target = torch.zeros(B, Q, H * W)
    target[:, 0, :6] = 1
    target[:, 2, 6:10] = 1  # pixels 10, 11 void
    void = target.sum(1) < 1
    area = torch.einsum("bqp,bq->bp", target, target.sum(-1))
    inverse_area = H * W / area.clamp(min=1)
    k = 5
    index = kc.gumbel_topk(torch.log(inverse_area) * 1.5 + void * -99999.0, k, torch.Generator().manual_seed(7))
    per_image = []
    for b in range(B):
        idx = index[b].tolist()
        assert not any(void[b, i] for i in idx)
        row = []
        for j in idx:  # one distribution over the sampled pixels per sampled pixel j
            same = [float((target[b, :, i] * target[b, :, j]).sum()) for i in idx]
            total = max(sum(same), 1.0)
            sims = [float(feature[b, :, i] @ feature[b, :, j]) / 0.3 for i in idx]
            lse = math.log(sum(math.exp(s) for s in sims))
            row.append(-sum(t / total * (s - lse) for t, s in zip(same, sims)))
        per_image.append(row)
    loss = kc.pixel_insdis_loss(feature, target, void, inverse_area, 1.5, k, torch.Generator().manual_seed(7))
    assert loss.item() == pytest.approx(naive_mean_of_nonzero(per_image), rel=1e-5)


@pytest.mark.parametrize("coarse", [False, True])
def test_aux_semantic_loss_by_hand(coarse):
    """Every pixel (SAMPLE_K 0), void ignored; a coarser prediction reads the labels at its stride."""
    g = torch.Generator().manual_seed(4)
    semantic = torch.randint(0, K + 1, (B, 5, 5), generator=g)  # K = void
    void = semantic == K
    logits = torch.randn(B, K, 2, 2, generator=g) if coarse else torch.randn(B, K + 1, 5, 5, generator=g)
    labels = semantic[:, ::4, ::4] if coarse else semantic
    per_image = []
    for b in range(B):
        row = []
        for y, x in itertools.product(range(labels.shape[1]), range(labels.shape[2])):
            c = int(labels[b, y, x])
            if c == K:
                continue
            z = logits[b, :, y, x].tolist()
            row.append(math.log(sum(math.exp(v) for v in z)) - z[c])
        per_image.append(row)
    loss = kc.aux_semantic_loss(logits, semantic, void, torch.ones(B, 5, 5), 2.0, 0, K, None)
    assert loss.item() == pytest.approx(naive_mean_of_nonzero(per_image), rel=1e-5)


def test_matcher_maximises_similarity_times_class_probability(toy):
    logits, mask_logits, targets = toy
    indices, sims, probs = kc.kMaXMatcher()({"pred_logits": logits, "pred_masks": mask_logits}, targets)
    for b, t in enumerate(targets):
        masks = t["masks"].flatten(1)
        labelled = masks.sum(0) > 0
        p = mask_logits[b].flatten(1).softmax(0) * labelled

        def sim(q, j):
            return float((p[q] * masks[j]).sum() / ((p[q].sum() + masks[j].sum()) / 2 + 1e-5))

        def prob(q, j):
            return float(logits[b, q].softmax(-1)[t["labels"][j]])

        n = len(t["labels"])
        best = max(itertools.permutations(range(Q), n), key=lambda qs: sum(sim(q, j) * prob(q, j)
                                                                           for j, q in enumerate(qs)))
        rows, cols = indices[b]
        assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(best))
        for r, c, s, pr in zip(rows.tolist(), cols.tolist(), sims[b].tolist(), probs[b].tolist()):
            assert s == pytest.approx(sim(r, c), rel=1e-5) and pr == pytest.approx(prob(r, c), rel=1e-5)


def test_loss_weights_of_unmatched_queries(toy):
    """Unmatched queries: class target void, class weight = the share of their mask on void
    pixels (at least NO_OBJECT_WEIGHT), no dice weight."""
    logits, mask_logits, targets = toy
    crit = kc.kMaXSetCriterion(K, weight_dict={}, eos_coef=1e-5)
    outputs = {"pred_logits": logits, "pred_masks": mask_logits}
    matching = crit.matcher(outputs, targets)
    gt = crit.process_targets(outputs, targets, matching)
    for b, (rows, cols) in enumerate(matching[0]):
        void = targets[b]["masks"].sum(0) == 0
        assert torch.equal(gt["void"][b], void)
        for q in set(range(Q)) - set(rows.tolist()):
            p = mask_logits[b].softmax(0)[q]
            share = float((p * void).sum() / (p.sum() + 1e-5))
            assert gt["labels"][b, q] == K and gt["mask_weight"][b, q] == 0
            assert float(gt["class_weight"][b, q]) == pytest.approx(max(share, 1e-5), rel=1e-5)
        for q, j, sim, prob in zip(rows.tolist(), cols.tolist(), matching[1][b].tolist(), matching[2][b].tolist()):
            assert gt["class_weight"][b, q] == pytest.approx(max(sim, 1e-5))
            assert gt["mask_weight"][b, q] == pytest.approx(max(prob, 1e-5))
            assert gt["labels"][b, q] == targets[b]["labels"][j]
            assert torch.equal(gt["masks"][b, q], targets[b]["masks"][j])
    assert torch.equal(gt["semantic"][1, 0], torch.full((W,), 1))


def test_sampling_is_reproducible_from_the_seed(toy):
    logits, mask_logits, targets = toy
    outputs = {"pred_logits": logits, "pred_masks": mask_logits,
               "pixel_feature": torch.randn(B, 8, H, W, generator=torch.Generator().manual_seed(5))}

    def insdis(seed, k=3):
        crit = kc.kMaXSetCriterion(K, weight_dict={}, eos_coef=1e-5, losses=["pixels"], pixel_insdis_sample_k=k,
                                   seed=seed)
        return [crit(outputs, targets)["loss_pixel_insdis"].item() for _ in range(3)]

    torch.manual_seed(0)
    first = insdis(11)
    torch.manual_seed(1)  # the global RNG plays no part
    assert insdis(11) == first
    assert len(set(first)) > 1  # each call draws anew
    assert insdis(12) != first
    assert len(set(insdis(11, k=H * W))) == 1  # k >= pixels: every labelled pixel, no chance left


def tiny_model(*opts):
    cfg = tiny_cfg("MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K", "64", "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K",
                   "64", "SEED", "0", *opts)
    torch.manual_seed(0)
    return m2f.build_model(cfg).train()


def sample(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, : h // 2] = True
    masks[1, h // 2:, : w // 2] = True
    masks[2, h // 2:, w // 2 + 3:] = True  # a void strip
    image = torch.rand(3, h, w, generator=g) * 60
    for i, m in enumerate(masks):
        image[i % 3][m] += 150
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor([3, 5, 7])
    inst.gt_masks = masks
    return {"image": image, "instances": inst}


@pytest.mark.slow
def test_training_forward_gradients_and_loss_decrease():
    model = tiny_model()
    batch = [sample(65, 65, 0), sample(50, 61, 1)]
    losses = model(batch)
    layers = 3  # TRANS_DEC.DEC_LAYERS [1, 1, 1]
    names = ["loss_ce", "loss_mask", "loss_dice", "loss_pixel_insdis"]
    assert set(losses) == set(names + ["loss_aux_semantic"] + [f"{n}_{i}" for n in names for i in range(layers)])
    weights = model.criterion.weight_dict
    assert weights["loss_ce"] == 3.0 and weights["loss_mask_2"] == 0.3 and weights["loss_dice"] == 3.0
    sum(losses.values()).backward()
    head = model.sem_seg_head
    for name, module in [("cluster centres", head.predictor._cluster_centers),
                         ("first k-means layer", head.predictor._kmax_transformer_layers[0]._kmeans_query_conv3_bn),
                         ("pixel decoder", head.pixel_decoder), ("aux semantic head",
                                                                 head.predictor._auxiliary_semantic_predictor),
                         ("backbone", model.backbone)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    totals = []
    for _ in range(6):
        total = sum(model(batch).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < 0.9 * totals[0], totals


def test_training_inputs_larger_than_the_image_size_fail_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"larger than INPUT\.IMAGE_SIZE \[65, 65\].*crop"):
        model([sample(70, 60, 0)])
    with pytest.raises(ValueError, match=r"has no 'instances'"):
        model([{"image": torch.zeros(3, 65, 65)}])
