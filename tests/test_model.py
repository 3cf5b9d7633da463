"""Unit tests of the model's parts: the deformable-attention reference, post-processing,
padding, batching, the build/weights plumbing (MODEL.WEIGHTS), which outputs the TEST.*_ON flags
give, and which classes panoptic inference treats as things (DATASETS.TEST[0], else TRAIN[0])."""
import logging
import math

import pytest
import torch

import mask2former as m2f
from mask2former.modeling import postprocessing as post
from mask2former.modeling.meta_arch import pad_images
from mask2former.modeling.meta_arch.mask_former import thing_ids_for
from mask2former.ops import ms_deform_attn, ms_deform_attn_reference
from tests.conftest import REPO

SYNTHETIC = REPO / "configs" / "synthetic" / "panoptic.yaml"  # a small model, random weights


def naive_ms_deform_attn(value, shapes, starts, loc, attw):
    """Direct per-sample bilinear interpolation with zero padding (align_corners=False)."""
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl in range(nl):
                    hh, ww = (int(v) for v in shapes[lvl])
                    s0 = int(starts[lvl])
                    for k in range(p):
                        x = loc[b, q, h, lvl, k, 0] * ww - 0.5
                        y = loc[b, q, h, lvl, k, 1] * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yy < hh and 0 <= xx < ww:
                                    acc += wy * wx * value[b, s0 + yy * ww + xx, h]
                        out[b, q, h] += attw[b, q, h, lvl, k] * acc
    return out.reshape(n, lq, m * d)


def random_inputs(shapes, n=2, lq=5, m=2, d=3, p=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # locations in [-0.2, 1.2]: some fall outside the map and must read zeros
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    attw = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    attw = attw / attw.sum((-1, -2), keepdim=True)
    return value, shapes, starts, loc, attw


@pytest.mark.parametrize("shapes", [[[6, 4], [3, 2], [1, 1]], [[5, 7]], [[1, 1], [2, 3]]])
def test_ms_deform_attn_reference_matches_naive(shapes):
    args = random_inputs(shapes)
    torch.testing.assert_close(ms_deform_attn_reference(*args), naive_ms_deform_attn(*args))
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args))


def test_ms_deform_attn_checks_shapes():
    value, shapes, starts, loc, attw = random_inputs([[4, 4], [2, 2]])
    with pytest.raises(ValueError, match="spatial_shapes sum to"):
        ms_deform_attn(value[:, :-1], shapes, starts, loc, attw)
    with pytest.raises(ValueError, match="attention_weights must have shape"):
        ms_deform_attn(value, shapes, starts, loc, attw[..., :1])
    with pytest.raises(ValueError, match="share a dtype"):
        ms_deform_attn(value.float(), shapes, starts, loc, attw)
    with pytest.raises(ValueError, match=r"value must be \(N, S, M, D\)"):
        ms_deform_attn(value[0], shapes, starts, loc, attw)


def logits_for(probs):
    return torch.log(torch.as_tensor(probs, dtype=torch.float32))


def test_semantic_inference_is_probability_weighted_sum():
    mask_cls = logits_for([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])  # Q=2, K=2 (+ no-object)
    mask_pred = torch.tensor([[[10.0, -10.0]], [[-10.0, 10.0]]])  # (Q, 1, 2)
    sem = post.semantic_inference(mask_cls, mask_pred)
    assert sem.shape == (2, 1, 2)
    torch.testing.assert_close(sem[:, 0, 0], torch.tensor([0.7, 0.2]), atol=1e-3, rtol=0)
    torch.testing.assert_close(sem[:, 0, 1], torch.tensor([0.1, 0.8]), atol=1e-3, rtol=0)


def test_panoptic_merges_stuff_separates_things_and_drops_weak_queries():
    # K=3 classes: 0 and 1 are things, 2 is stuff. Masks are 1x6 strips.
    big = 20.0
    mask_pred = torch.full((5, 1, 6), -big)
    mask_pred[0, 0, 0:2] = big  # thing 0
    mask_pred[1, 0, 2:3] = big  # thing 0 again: its own segment
    mask_pred[2, 0, 3:4] = big  # stuff 2
    mask_pred[3, 0, 4:6] = big  # stuff 2 again: merged with query 2
    mask_pred[4, 0, :] = big    # predicts "no object": dropped
    mask_cls = logits_for([[0.9, 0.05, 0.03, 0.02], [0.9, 0.05, 0.03, 0.02], [0.02, 0.03, 0.9, 0.05],
                           [0.02, 0.03, 0.9, 0.05], [0.01, 0.01, 0.01, 0.97]])
    seg, info = post.panoptic_inference(mask_cls, mask_pred, num_classes=3, thing_ids={0, 1},
                                        object_mask_threshold=0.5, overlap_threshold=0.8)
    assert seg.dtype == torch.int32
    assert seg[0].tolist() == [1, 1, 2, 3, 3, 3]
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": True, "category_id": 0},
                    {"id": 3, "isthing": False, "category_id": 2}]


def test_panoptic_overlap_threshold_and_empty_results():
    mask_pred = torch.full((2, 1, 4), -20.0)
    mask_pred[0, 0, :] = 20.0  # covers everything, lower score
    mask_pred[1, 0, 1:] = 20.0  # wins 3 of query 0's 4 pixels
    mask_cls = logits_for([[0.6, 0.3, 0.1], [0.1, 0.85, 0.05]])
    kw = dict(num_classes=2, thing_ids={0, 1}, object_mask_threshold=0.5)
    seg, info = post.panoptic_inference(mask_cls, mask_pred, overlap_threshold=0.8, **kw)
    assert [s["category_id"] for s in info] == [1] and seg[0].tolist() == [0, 1, 1, 1]
    seg, info = post.panoptic_inference(mask_cls, mask_pred, overlap_threshold=0.2, **kw)
    assert [s["category_id"] for s in info] == [0, 1] and seg[0].tolist() == [1, 2, 2, 2]
    seg, info = post.panoptic_inference(mask_cls, mask_pred, object_mask_threshold=0.99, num_classes=2,
                                        thing_ids=None, overlap_threshold=0.8)
    assert info == [] and int(seg.abs().sum()) == 0


def test_instance_inference_topk_scores_boxes_and_thing_filter():
    mask_pred = torch.full((2, 4, 5), -20.0)
    mask_pred[0, 1:3, 1:4] = 20.0
    mask_pred[1, 0:1, 0:2] = 2.0
    mask_cls = logits_for([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    ins = post.instance_inference(mask_cls, mask_pred, num_classes=2, topk=3)
    assert len(ins) == 3 and ins.image_size == (4, 5)
    order = ins.scores.argsort(descending=True)
    assert ins.pred_classes[order].tolist() == [1, 0, 1]
    # query 1 with class 1: probability 0.7 times the mean mask probability sigmoid(2)
    torch.testing.assert_close(ins.scores[order][0], torch.tensor(0.7 * torch.sigmoid(torch.tensor(2.0)).item()),
                               atol=1e-5, rtol=0)
    boxes = ins.pred_boxes.tensor[order]
    assert boxes[0].tolist() == [0.0, 0.0, 2.0, 1.0] and boxes[1].tolist() == [1.0, 1.0, 4.0, 3.0]
    only_things = post.instance_inference(mask_cls, mask_pred, num_classes=2, topk=3, thing_ids={0})
    # the top 3 pairs hold one class-0 pair (q0: 0.6); the stuff pairs are dropped after top-k
    assert only_things.pred_classes.tolist() == [0]


def test_masks_to_boxes_empty_mask():
    masks = torch.zeros(2, 3, 3)
    masks[1, 2, 2] = 1
    assert post.masks_to_boxes(masks).tolist() == [[0, 0, 0, 0], [2, 2, 3, 3]]


def test_sem_seg_postprocess_crops_padding_then_resizes():
    result = torch.zeros(1, 8, 8)
    result[:, :5, :6] = 1.0  # the image; the rest is padding
    out = post.sem_seg_postprocess(result, (5, 6), 10, 12)
    assert out.shape == (1, 10, 12) and torch.allclose(out, torch.ones_like(out))


def test_pad_images_to_multiple_of_divisibility():
    batch, sizes = pad_images([torch.ones(3, 5, 7), torch.ones(3, 9, 4)], size_divisibility=4)
    assert batch.shape == (2, 3, 12, 8) and sizes == [(5, 7), (9, 4)]
    assert batch[0, :, :5, :7].eq(1).all() and batch[0, :, 5:].eq(0).all() and batch[1, :, :, 4:].eq(0).all()
    single, _ = pad_images([torch.ones(3, 32, 33)], size_divisibility=32)
    assert single.shape == (1, 3, 32, 64)


@pytest.fixture(scope="module")
def panoptic_model(parity_dir):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / "tiny_panoptic.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", str(parity_dir / "tiny_panoptic.pkl")])
    return cfg, m2f.build_model(cfg).eval()


def test_model_weights_are_loaded_by_build_model(panoptic_model, parity_dir):
    import pickle

    _, model = panoptic_model
    with open(parity_dir / "tiny_panoptic.pkl", "rb") as f:
        ref = pickle.load(f, encoding="latin1")["model"]
    key = "sem_seg_head.predictor.query_feat.weight"
    assert torch.equal(model.state_dict()[key], torch.from_numpy(ref[key]))


def _assert_same_result(a, b, exact_values: bool):
    """The README's promise for a list of images: the same segments, classes, masks and boxes;
    probabilities and scores bitwise equal (``exact_values``) or within float rounding (1e-4)."""
    assert a.keys() == b.keys()
    if exact_values:
        assert torch.equal(a["sem_seg"], b["sem_seg"])
        assert torch.equal(a["instances"].scores, b["instances"].scores)
    torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=1e-4, rtol=0)
    torch.testing.assert_close(a["instances"].scores, b["instances"].scores, atol=1e-4, rtol=0)
    assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
    for field in ("pred_classes", "pred_masks"):
        assert torch.equal(getattr(a["instances"], field), getattr(b["instances"], field)), field
    assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_batched_equals_single_and_uint8_equals_float(panoptic_model, monkeypatch):
    _, model = panoptic_model
    g = torch.Generator().manual_seed(0)
    # the first and last share a padded size (64x96) and run as one batch; the middle one alone
    images = [torch.randint(0, 256, (3, 61, 90), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 77, 50), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 64, 70), generator=g, dtype=torch.uint8)]
    batches = []
    predict_padded = model.predict_padded

    def spy(batch):
        batches.append(tuple(batch.shape))
        return predict_padded(batch)

    monkeypatch.setattr(model, "predict_padded", spy)
    with torch.no_grad():
        batched = model([{"image": im, "height": 40, "width": 60} for im in images])
        assert batches == [(2, 3, 64, 96), (1, 3, 96, 64)]
        single = [model([{"image": im.float(), "height": 40, "width": 60}])[0] for im in images]
    for b, s in zip(batched, single):
        assert b["sem_seg"].shape == (133, 40, 60)
        # same-size images share a batch: equal up to float summation order
        torch.testing.assert_close(b["sem_seg"], s["sem_seg"], atol=1e-4, rtol=0)
        assert b["panoptic_seg"][1] == s["panoptic_seg"][1]
        assert torch.equal(b["panoptic_seg"][0], s["panoptic_seg"][0])
        assert torch.equal(b["instances"].pred_classes, s["instances"].pred_classes)
        torch.testing.assert_close(b["instances"].scores, s["instances"].scores, atol=1e-4, rtol=0)
        assert b["instances"].pred_masks.shape[-2:] == (40, 60)
    # an image alone in its padded size runs alone: bitwise its single-image result (uint8 or
    # float input); the batched pair only up to float rounding, with the same segments
    _assert_same_result(batched[1], single[1], exact_values=True)
    for i in (0, 2):
        _assert_same_result(batched[i], single[i], exact_values=False)


def test_decoder_outputs_one_prediction_per_dec_layer(panoptic_model):
    cfg, model = panoptic_model
    with torch.no_grad():
        images, _ = model.preprocess([{"image": torch.zeros(3, 64, 64)}])
        out = model.sem_seg_head(model.backbone(images))
    assert len(out["aux_outputs"]) == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
    assert out["pred_logits"].shape == (1, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, 134)
    assert out["pred_masks"].shape == (1, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, 16, 16)


def test_training_mode_without_instances_names_the_sample_and_the_mapper_contract(panoptic_model):
    from mask2former.structures import Instances

    _, model = panoptic_model
    model.train()
    ok = {"image": torch.zeros(3, 32, 32), "instances": Instances(
        (32, 32), gt_classes=torch.zeros(0, dtype=torch.int64), gt_masks=torch.zeros(0, 32, 32, dtype=torch.bool))}
    try:
        with pytest.raises(ValueError, match=r"batched_inputs\[1\] has no 'instances'.*mapper must provide"):
            model([ok, {"image": torch.zeros(3, 32, 32)}])
        losses = model([ok])  # an image without segments: all queries are "no object"
        assert losses["loss_mask"].item() == 0 and losses["loss_ce"].item() > 0
    finally:
        model.eval()


# ----------------------------------------------------------------------------- build_model and flags
def _synthetic_cfg(*opts):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(SYNTHETIC))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _float_state(model):
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_build_model_loads_model_weights_when_the_file_exists(tmp_path, caplog):
    missing = tmp_path / "no_such_model.pth"
    # default: a missing file is skipped with a warning naming it (official configs name
    # ImageNet files such as R-50.pkl that only training needs)
    with caplog.at_level(logging.WARNING, logger="mask2former"):
        m2f.build_model(_synthetic_cfg("MODEL.WEIGHTS", str(missing)))
    assert [r.levelno for r in caplog.records if str(missing) in r.getMessage()] == [logging.WARNING]
    assert "does not exist" in caplog.text
    # load_weights=True makes the file required
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS.*{missing.name}"):
        m2f.build_model(_synthetic_cfg("MODEL.WEIGHTS", str(missing)), load_weights=True)

    # an existing file is loaded: every tensor of the built model is the file's (shifted by 1 so
    # that no random initialisation can equal it)
    saved = {k: v + 1 for k, v in _float_state(m2f.build_model(_synthetic_cfg())).items()}
    path = tmp_path / "model.pth"
    torch.save({"model": saved}, path)
    for load_weights in (None, True):
        loaded = _float_state(m2f.build_model(_synthetic_cfg("MODEL.WEIGHTS", str(path)), load_weights=load_weights))
        assert loaded.keys() == saved.keys()
        assert [k for k in saved if not torch.equal(loaded[k], saved[k])] == []
    untouched = _float_state(m2f.build_model(_synthetic_cfg("MODEL.WEIGHTS", str(path)), load_weights=False))
    assert all(not torch.equal(untouched[k], saved[k]) for k in saved)


@pytest.mark.parametrize("semantic, panoptic, instance", [
    (s, p, i) for s in (True, False) for p in (True, False) for i in (True, False)])
def test_outputs_follow_the_test_on_flags(semantic, panoptic, instance):
    flags = {"sem_seg": semantic, "panoptic_seg": panoptic, "instances": instance}
    t = "MODEL.MASK_FORMER.TEST."
    cfg = _synthetic_cfg(t + "SEMANTIC_ON", str(semantic), t + "PANOPTIC_ON", str(panoptic),
                         t + "INSTANCE_ON", str(instance))
    if not any(flags.values()):
        # with nothing on, semantic post-processing is off and the masks must be resized first
        with pytest.raises(ValueError, match="SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE"):
            m2f.build_model(cfg)
        cfg.merge_from_list([t + "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", "True"])
    model = m2f.build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 40, 56), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    expected = {k for k, on in flags.items() if on}
    for fast in (True, False):  # the accelerated post-processing and the plain one
        model.fast_inference = fast
        with torch.no_grad():
            out = model([{"image": image, "height": 20, "width": 28}, {"image": image}])
        assert [set(o) for o in out] == [expected, expected], fast
        if semantic:
            assert out[0]["sem_seg"].shape == (5, 20, 28) and out[1]["sem_seg"].shape == (5, 40, 56)
        if panoptic:
            assert out[0]["panoptic_seg"][0].shape == (20, 28)
        if instance:
            assert out[0]["instances"].image_size == (20, 28)


# ----------------------------------------------------------------------------- things and stuff
@pytest.mark.parametrize("test, train, expected", [
    (("ade20k_panoptic_val",), ("synthetic_panoptic_train",), "ade20k"),      # TEST[0] first
    ((), ("ade20k_panoptic_val",), "ade20k"),                                  # else TRAIN[0]
    (("no_such_dataset_for_things",), ("synthetic_panoptic_train",), {0, 1, 2}),  # unknown TEST[0]
    (("no_such_dataset_for_things", "synthetic_panoptic_val"), (), None),       # only TEST[0] counts
    (("no_such_dataset_for_things",), (), None),                               # unknown: all things
])
def test_thing_ids_come_from_test_then_train_dataset(test, train, expected):
    from mask2former.data import MetadataCatalog

    cfg = m2f.get_cfg()
    cfg.DATASETS.TEST, cfg.DATASETS.TRAIN = test, train
    if expected == "ade20k":
        expected = set(MetadataCatalog.get("ade20k_panoptic_val").thing_dataset_id_to_contiguous_id.values())
        assert len(expected) == 100 and expected != {0, 1, 2}
    assert thing_ids_for(cfg) == expected


def test_unknown_dataset_keeps_same_class_segments_apart():
    """Two queries of class 3 ("sky", stuff in the synthetic set) over the two halves of the image:
    merged into one stuff segment when the dataset is known, two thing segments when it is not."""
    num_queries = 16
    logits = torch.full((1, num_queries, 6), -10.0)
    logits[0, :, 5] = 10.0  # "no object"
    logits[0, :2, 5], logits[0, :2, 3] = -10.0, 10.0
    masks = torch.full((1, num_queries, 8, 8), -20.0)
    masks[0, 0, :, :4] = 20.0
    masks[0, 1, :, 4:] = 20.0
    outputs = {"pred_logits": logits, "pred_masks": masks}
    t = "MODEL.MASK_FORMER.TEST."
    results = {}
    for name in ("synthetic_panoptic_val", "no_such_dataset_for_things"):
        cfg = _synthetic_cfg("DATASETS.TEST", f"('{name}',)", "DATASETS.TRAIN", "()", t + "SEMANTIC_ON", "False",
                             t + "INSTANCE_ON", "False")
        model = m2f.build_model(cfg).eval()
        for fast in (True, False):
            model.fast_inference = fast
            with torch.no_grad():
                seg, info = model.postprocess(outputs, [{}], [(32, 32)], (32, 32))[0]["panoptic_seg"]
            results.setdefault(name, []).append((seg[:, [0, -1]].unique().tolist(), info))
    assert results["synthetic_panoptic_val"] == 2 * [([1], [{"id": 1, "isthing": False, "category_id": 3}])]
    assert results["no_such_dataset_for_things"] == 2 * [
        ([1, 2], [{"id": 1, "isthing": True, "category_id": 3}, {"id": 2, "isthing": True, "category_id": 3}])]
