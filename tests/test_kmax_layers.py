"""kMaX-DeepLab's building blocks: the k-means update against a naive loop, the backbones, the
training-only outputs of the head, and configs that cannot build (each error names its key)."""
import pytest
import torch
from torch import nn

import mask2former as m2f
from mask2former.modeling.backbone import build_backbone
from mask2former.modeling.transformer_decoder.kmax_transformer_decoder import kmeans_assignment, kmeans_update
from tests.conftest import REPO

TINY = REPO.parent / "shared" / "parity" / "kmax" / "tiny_kmax_panoptic.yaml"
# a tiny kMaX model on our own config (no ../shared needed): R50 layout, small widths, 65 x 65 input
TINY_OPTS = ["MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
             "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_LAYERS", "[1, 1, 1, 1]",
             "MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_CHANNELS", "[32, 16, 8, 8]",
             "MODEL.KMAX_DEEPLAB.TRANS_DEC.IN_CHANNELS", "[128, 64, 32, 32]",
             "MODEL.KMAX_DEEPLAB.TRANS_DEC.DEC_LAYERS", "[1, 1, 1]", "MODEL.KMAX_DEEPLAB.TRANS_DEC.NUM_OBJECT_QUERIES",
             "6", "INPUT.IMAGE_SIZE", "[65, 65]", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]


def tiny_cfg(*opts, config="configs/coco/panoptic_segmentation/kmax_r50.yaml"):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO / config))
    cfg.merge_from_list(TINY_OPTS + list(opts))
    return cfg


def build_meta(cfg):
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return m2f.build_model(cfg)


# ----------------------------------------------------------------------------- k-means
def naive_kmeans(mask_logits, pixel_value):
    """Each pixel to its arg-max cluster, then per-cluster sums, one pixel at a time."""
    b, q = mask_logits.shape[:2]
    logits = mask_logits.flatten(2)
    out = torch.zeros(b, pixel_value.shape[1], q, dtype=torch.float64)
    for i in range(b):
        for m in range(logits.shape[-1]):
            out[i, :, int(logits[i, :, m].argmax())] += pixel_value[i, :, m].double()
    return out


def test_kmeans_update_is_a_sum_per_arg_max_cluster():
    g = torch.Generator().manual_seed(0)
    mask_logits = torch.randn(2, 5, 6, 7, generator=g)
    pixel_value = torch.randn(2, 4, 42, generator=g)
    assignment = kmeans_assignment(mask_logits)
    assert assignment.shape == (2, 5, 42) and torch.equal(assignment.sum(1), torch.ones(2, 42))
    # float32 sums against float64 ones
    torch.testing.assert_close(kmeans_update(assignment, pixel_value).double(), naive_kmeans(mask_logits, pixel_value),
                               rtol=1e-5, atol=1e-5)


def test_kmeans_gradient_reaches_the_pixel_values_not_the_assignment():
    """As the official layer: the assignment is a hard, gradient-free decision; each pixel value
    receives the gradient of the centre it was assigned to."""
    g = torch.Generator().manual_seed(1)
    mask_logits = torch.randn(1, 3, 4, 4, generator=g, requires_grad=True)
    pixel_value = torch.randn(1, 2, 16, generator=g, requires_grad=True)
    assignment = kmeans_assignment(mask_logits)
    assert not assignment.requires_grad
    upstream = torch.randn(1, 2, 3, generator=g)
    (kmeans_update(assignment, pixel_value) * upstream).sum().backward()
    assert mask_logits.grad is None
    owner = mask_logits.detach().flatten(2).argmax(1)[0]  # (16,) cluster of each pixel
    torch.testing.assert_close(pixel_value.grad[0], upstream[0][:, owner])


def test_kmeans_update_sums_in_float32_under_autocast():
    pixel_value = torch.randn(1, 8, 30, dtype=torch.bfloat16)
    assignment = kmeans_assignment(torch.randn(1, 4, 5, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kmeans_update(assignment, pixel_value).dtype == torch.float32


# ----------------------------------------------------------------------------- backbones
def test_custom_bn_resnet_has_tf_batch_norm_and_the_basic_stem():
    cfg = tiny_cfg("MODEL.RESNETS.STEM_TYPE", "deeplab")  # not read by this builder, as officially
    backbone = build_backbone(cfg)
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.SyncBatchNorm and m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    assert "stem.conv1.weight" in backbone.state_dict() and "stem.conv2.weight" not in backbone.state_dict()


def test_convnext_features_are_ceil_of_odd_sizes():
    cfg = tiny_cfg("MODEL.BACKBONE.NAME", "D2ConvNeXt", "MODEL.CONVNEXT.DEPTHS", "[1, 1, 2, 1]",
                   "MODEL.CONVNEXT.DIMS", "[8, 16, 24, 32]", "MODEL.CONVNEXT.OUT_FEATURES",
                   "['stem', 'res2', 'res3', 'res4', 'res5']")
    backbone = build_backbone(cfg)
    out = backbone(torch.randn(1, 3, 65, 97))
    sizes = {k: tuple(v.shape[1:]) for k, v in out.items()}
    assert sizes == {"stem": (8, 17, 25), "res2": (8, 17, 25), "res3": (16, 9, 13), "res4": (24, 5, 7),
                     "res5": (32, 3, 4)}
    # the official stride of "stem" (2) orders it after res2 in the pixel decoder
    assert backbone.output_shape()["stem"].stride == 2


@pytest.mark.slow
def test_a_convnext_kmax_model_runs_with_a_stem_stage():
    """The Cityscapes layout: five pixel-decoder stages, the last on ConvNeXt's stem."""
    cfg = tiny_cfg("MODEL.BACKBONE.NAME", "D2ConvNeXt", "MODEL.CONVNEXT.DEPTHS", "[1, 1, 1, 1]",
                   "MODEL.CONVNEXT.DIMS", "[8, 16, 24, 32]", "MODEL.CONVNEXT.OUT_FEATURES",
                   "['stem', 'res2', 'res3', 'res4', 'res5']",
                   "MODEL.KMAX_DEEPLAB.PIXEL_DEC.IN_FEATURES", "['stem', 'res2', 'res3', 'res4', 'res5']",
                   "MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_LAYERS", "[1, 1, 1, 1, 1]",
                   "MODEL.KMAX_DEEPLAB.PIXEL_DEC.LAYER_TYPES", "['axial', 'axial', 'bottleneck', 'bottleneck', 'bottleneck']",
                   "MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_CHANNELS", "[32, 16, 8, 8, 4]",
                   "MODEL.KMAX_DEEPLAB.TRANS_DEC.IN_CHANNELS", "[128, 64, 32, 16]",
                   "MODEL.KMAX_DEEPLAB.TEST.SEMANTIC_ON", "True", "MODEL.KMAX_DEEPLAB.TEST.INSTANCE_ON", "True")
    model = m2f.build_model(cfg).eval()
    assert model.sem_seg_head.pixel_decoder.in_features == ["res5", "res4", "res3", "res2", "stem"]
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 40, 65) * 255, "height": 80, "width": 130}])[0]
    assert tuple(out["sem_seg"].shape) == (133, 80, 130) and tuple(out["panoptic_seg"][0].shape) == (80, 130)
    assert tuple(out["instances"].pred_masks.shape[1:]) == (80, 130)


# ----------------------------------------------------------------------------- training-only parts
@pytest.mark.slow
@pytest.mark.parametrize("decoder", [True, False])
def test_training_outputs_of_the_head(decoder):
    """What the losses will read: per-layer predictions at the final size, and the auxiliary
    semantic prediction (DeepLabv3+-style decoder at stride 4, or the light head at stride 32)."""
    cfg = tiny_cfg("MODEL.KMAX_DEEPLAB.USE_AUX_SEMANTIC_DECODER", str(decoder))
    model = m2f.build_model(cfg)
    model.train()
    batch = torch.randn(2, 3, 65, 65)
    out = model.sem_seg_head(model.backbone(batch))
    assert tuple(out["pred_logits"].shape) == (2, 6, 134) and tuple(out["pred_masks"].shape) == (2, 6, 17, 17)
    assert len(out["aux_outputs"]) == 3
    assert all(tuple(a["pred_masks"].shape) == (2, 6, 17, 17) for a in out["aux_outputs"])
    assert tuple(out["aux_semantic_pred"].shape) == ((2, 134, 17, 17) if decoder else (2, 133, 3, 3))
    loss = out["pred_logits"].sum() + out["pred_masks"].sum() + out["aux_semantic_pred"].sum()
    loss.backward()
    assert model.sem_seg_head.predictor._cluster_centers.weight.grad is not None


def test_no_aux_semantic_keys_without_its_loss():
    keys = build_meta(tiny_cfg("MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT", "0.0")).state_dict()
    assert not any("_auxiliary_semantic_predictor" in k for k in keys)
    assert any("_auxiliary_semantic_predictor" in k for k in build_meta(tiny_cfg()).state_dict())


# ----------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("opts, error, match", [
    (["INPUT.IMAGE_SIZE", "[64, 100]"], ValueError, r"INPUT\.IMAGE_SIZE \[64, 100\].*position tables"),
    (["MODEL.KMAX_DEEPLAB.PIXEL_DEC.LAYER_TYPES", "['axial', 'conv', 'bottleneck', 'bottleneck']"], ValueError,
     r"PIXEL_DEC\.LAYER_TYPES.*unknown \['conv'\]"),
    (["MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_LAYERS", "[1, 1, 1]"], ValueError, r"MODEL\.KMAX_DEEPLAB\.PIXEL_DEC.*one entry"),
    (["MODEL.KMAX_DEEPLAB.PIXEL_DEC.IN_FEATURES", "['res2', 'res3', 'res4', 'res6']"], ValueError,
     r"PIXEL_DEC\.IN_FEATURES.*does not return \['res6'\]"),
    (["MODEL.KMAX_DEEPLAB.TRANS_DEC.IN_CHANNELS", "[128, 64, 32]"], ValueError, r"TRANS_DEC\.IN_CHANNELS needs 4"),
    (["MODEL.KMAX_DEEPLAB.TRANS_DEC.DEC_LAYERS", "[1, 1]"], ValueError, r"TRANS_DEC\.DEC_LAYERS needs 3"),
    (["MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME", "Nope"], KeyError, r"MODEL\.KMAX_DEEPLAB\.PIXEL_DEC\.NAME = 'Nope'"),
    (["MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME", "Nope"], KeyError, r"MODEL\.KMAX_DEEPLAB\.TRANS_DEC\.NAME = 'Nope'"),
    (["MODEL.RESNETS.NORM", "FrozenBN"], ValueError, r"MODEL\.RESNETS\.NORM 'FrozenBN'.*custom_bn_build_resnet"),
    (["MODEL.RESNETS.RES5_DILATION", "4"], ValueError, r"RES5_DILATION must be 1 or 2"),
    (["MODEL.BACKBONE.NAME", "D2ConvNeXt", "MODEL.CONVNEXT.OUT_FEATURES", "['res6']"], ValueError,
     r"MODEL\.CONVNEXT\.OUT_FEATURES.*unknown \['res6'\]"),
])
def test_bad_config_names_the_key(opts, error, match):
    with pytest.raises(error, match=match):
        build_meta(tiny_cfg(*opts))


def test_even_sizes_that_divide_the_strides_work():
    build_meta(tiny_cfg("INPUT.IMAGE_SIZE", "[64, 96]"))  # 64 and 96 are multiples of 32: tables fit


@pytest.mark.slow
def test_a_feature_of_another_size_fails_clearly():
    model = m2f.build_model(tiny_cfg()).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"built for 3 positions.*padded to INPUT\.IMAGE_SIZE"):
        model.predict_padded(torch.zeros(1, 3, 97, 97))


# ----------------------------------------------------------------------------- CMT-DeepLab's soft clustering
def naive_soft_kmeans(mask_logits, pixel_value):
    """Each pixel shared among the clusters by its softmax over them, one pixel at a time."""
    b, q = mask_logits.shape[:2]
    logits = mask_logits.flatten(2).double()
    out = torch.zeros(b, pixel_value.shape[1], q, dtype=torch.float64)
    for i in range(b):
        for m in range(logits.shape[-1]):
            weights = torch.exp(logits[i, :, m]) / torch.exp(logits[i, :, m]).sum()
            for c in range(q):
                out[i, :, c] += weights[c] * pixel_value[i, :, m].double()
    return out


def test_soft_assignment_is_a_softmax_over_clusters_with_gradient():
    g = torch.Generator().manual_seed(2)
    mask_logits = torch.randn(2, 5, 3, 4, generator=g, requires_grad=True)
    pixel_value = torch.randn(2, 4, 12, generator=g)
    assignment = kmeans_assignment(mask_logits, "softmax")
    torch.testing.assert_close(assignment.sum(1), torch.ones(2, 12))
    update = kmeans_update(assignment, pixel_value)
    torch.testing.assert_close(update.double(), naive_soft_kmeans(mask_logits.detach(), pixel_value),
                               rtol=1e-5, atol=1e-5)
    update.sum().backward()
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"TRANS_DEC\.ASSIGNMENT must be one of \['argmax', 'softmax'\], got 'hard'"):
        kmeans_assignment(mask_logits, "hard")


def test_assignment_key_reaches_every_layer_and_bad_values_name_it():
    model = build_meta(tiny_cfg("MODEL.KMAX_DEEPLAB.TRANS_DEC.ASSIGNMENT", "softmax"))
    layers = model.sem_seg_head.predictor._kmax_transformer_layers
    assert [layer.assignment for layer in layers] == ["softmax"] * 3
    assert {layer.assignment for layer in build_meta(tiny_cfg()).sem_seg_head.predictor._kmax_transformer_layers
            } == {"argmax"}
    with pytest.raises(ValueError, match=r"MODEL\.KMAX_DEEPLAB\.TRANS_DEC\.ASSIGNMENT.*got 'hard'"):
        build_meta(tiny_cfg("MODEL.KMAX_DEEPLAB.TRANS_DEC.ASSIGNMENT", "hard"))


def test_the_layer_updates_with_its_assignment(monkeypatch):
    from mask2former.modeling.transformer_decoder import kmax_transformer_decoder as dec

    modes = []

    def recording(mask_logits, mode="argmax"):
        modes.append(mode)
        return kmeans_assignment(mask_logits, mode)

    monkeypatch.setattr(dec, "kmeans_assignment", recording)
    layer = dec.kMaXTransformerLayer(4, 8, assignment="softmax").eval()
    with torch.no_grad():
        layer(torch.randn(1, 8, 3, 3), torch.randn(1, 256, 5))
    assert modes == ["softmax"]
