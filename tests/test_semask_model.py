"""SeMask at the model level (issue 16): the auxiliary loss ``loss_cate`` (its weight, the gradients
it sends into every stage's semantic layer and the Swin blocks), bad configurations failing with
messages that name the key, the released models' state dicts (../shared/parity/semask manifests)
and fast inference giving the plain model's outputs bitwise.

The model is the official ADE20K SeMask config shrunk: Swin with EMBED_DIM 16 and DEPTHS [2, 2, 2,
2], 4x4 windows, 5 classes, 32-channel Mask2Former, 64x64 images.
"""
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

import mask2former as m2f
from mask2former.accel.postprocess import FastSeMaskMaskFormer
from mask2former.modeling.backbone.semask_swin import D2SeMaskSwinTransformer
from mask2former.modeling.criterion import semantic_prior_loss
from mask2former.modeling.meta_arch.semask_mask_former import SeMaskMaskFormer
from mask2former.structures import Instances
from tests.conftest import REPO
from tests.test_manifests import build_from_official_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADE = "configs/ade20k/semantic-segmentation/semask_swin/maskformer2_semask_swin_large_IN21k_384_bs16_160k_res640.yaml"
R50 = "configs/ade20k/semantic-segmentation/semask_swin/semask_maskformer2_R50_bs16_160k.yaml"
K = 5
TINY = ["MODEL.SWIN.EMBED_DIM", 16, "MODEL.SWIN.DEPTHS", [2, 2, 2, 2], "MODEL.SWIN.NUM_HEADS", [1, 2, 2, 4],
        "MODEL.SWIN.WINDOW_SIZE", 4, "MODEL.SWIN.SEM_WINDOW_SIZE", 4, "MODEL.SWIN.DROP_PATH_RATE", 0.0,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", K, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1, "MODEL.MASK_FORMER.HIDDEN_DIM", 32,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 6, "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64,
        "MODEL.MASK_FORMER.DEC_LAYERS", 3, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 64, "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", "cpu"]
SEMANTIC_KEYS = ("mlp_cls_q", "mlp_cls_k", "mlp_v", "mlp_res")


def tiny_cfg(*opts):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO / ADE))
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def tiny_model(*opts):
    torch.manual_seed(0)
    return m2f.build_model(tiny_cfg(*opts), load_weights=False)


def sample(seed, h=64, w=64, with_labels=True):
    """An image of two class regions with its instances and, unless told not to, its label map
    (a band of 255 along the top: unlabelled pixels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((h, w), 1 + seed % 3, dtype=torch.long)
    labels[h // 2:, : w // 2] = 4
    image = (torch.randint(0, 60, (3, h, w), generator=g) + 40 * labels).to(torch.uint8)
    classes = labels.unique()
    out = {"image": image, "instances": Instances((h, w), gt_classes=classes, gt_masks=labels[None] == classes[:, None, None])}
    if with_labels:
        labels[:3] = 255
        out["sem_seg"] = labels
    return out


def batch():
    return [sample(0), sample(1, 48, 64)]  # different sizes: the second image's labels are padded


def losses_of(model, data, seed=3):
    model.train()
    torch.manual_seed(seed)  # the criterion's random points and the semantic layers' dropout
    return model(data)


def semantic_params(model, stage, key):
    blk = model.backbone.layers[stage].semantic_layer.class_injection[0]
    return getattr(blk, key).weight if key in SEMANTIC_KEYS else getattr(blk, key)


def grads(loss, params):
    return [None if g is None else g.abs().sum().item()
            for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)]


# ----------------------------------------------------------------------------- the prior loss
def test_loss_cate_is_the_weighted_prior_loss_of_the_decoded_priors():
    model = tiny_model()
    losses = losses_of(model, batch())
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_cate"} <= set(losses)
    assert "loss_cate_0" not in losses  # no per-layer copies (the official ones are constant zeros)
    assert model.criterion.weight_dict["loss_cate"] == 0.4
    images, _ = model.preprocess(batch())
    with torch.no_grad():
        _, priors = model.backbone.forward_with_priors(images)
        logits = model.sem_seg_head.decode_priors(priors)
    assert logits.shape == (2, K, 64, 64)
    ref = semantic_prior_loss(logits, [x["sem_seg"] for x in batch()], 255)
    torch.testing.assert_close(losses["loss_cate"].detach(), 0.4 * ref)


def test_cate_weight_scales_only_loss_cate():
    a = losses_of(tiny_model(), batch())
    b = losses_of(tiny_model("MODEL.MASK_FORMER.CATE_WEIGHT", 0.8), batch())
    assert set(a) == set(b)
    torch.testing.assert_close(b["loss_cate"], 2 * a["loss_cate"])
    assert [k for k in a if k != "loss_cate" and not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("num_classes", [K, 150])  # 150: the last stage attends globally
def test_loss_cate_reaches_every_stages_priors_and_the_swin_blocks(num_classes):
    model = tiny_model("MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes)
    data = batch()
    loss = losses_of(model, data)["loss_cate"]
    stages = range(4)
    assert all(g > 0 for g in grads(loss, [semantic_params(model, i, "mlp_cls_q") for i in stages]))
    swin = [model.backbone.patch_embed.proj.weight] + [model.backbone.layers[i].blocks[1].mlp.fc2.weight
                                                       for i in stages]
    assert all(g > 0 for g in grads(loss, swin))
    # the prior decoder has no parameters: the loss trains the backbone only
    assert set(grads(loss, list(model.sem_seg_head.parameters()))) == {None}
    # The official zero initialisation (gamma = 0, mlp_res = 0) makes the attention branch's
    # gradient zero for any loss: d/dgamma = mlp_res(...) = 0 and every other path is scaled by gamma.
    total = sum(losses_of(model, data).values())
    for key in ("mlp_cls_k", "mlp_v", "mlp_res", "gamma"):
        assert set(grads(total, [semantic_params(model, i, key) for i in stages])) <= {0.0, None}, key


def test_loss_cate_reaches_mlp_cls_k_once_the_attention_branch_is_on():
    """With gamma and mlp_res away from zero (as in a trained model), a stage's mlp_cls_k shapes
    its output, hence the next stage's priors: loss_cate reaches it in stages 0-2; the last stage's
    mlp_cls_k feeds only res5, which the mask losses train."""
    model = tiny_model()
    with torch.no_grad():
        for i in range(4):
            semantic_params(model, i, "gamma").fill_(0.5)
            semantic_params(model, i, "mlp_res").normal_(0, 0.5)
    losses = losses_of(model, batch())
    k = [semantic_params(model, i, "mlp_cls_k") for i in range(4)]
    cate = grads(losses["loss_cate"], k)
    assert all(g > 0 for g in cate[:3]) and cate[3] in (None, 0.0)
    masks = grads(losses["loss_mask"] + losses["loss_dice"], k)
    assert all(g > 0 for g in masks)


def test_training_steps_on_loss_cate_alone_lower_it():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    values = []
    for _ in range(3):
        loss = losses_of(model, batch())["loss_cate"]
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[0] > values[1] > values[2]


# ----------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("opts, match", [
    (["MODEL.SWIN.SEM_WINDOW_SIZE", 0], r"MODEL.SWIN.SEM_WINDOW_SIZE must be a positive int; got 0"),
    (["MODEL.SWIN.SEM_WINDOW_SIZE", -1], r"MODEL.SWIN.SEM_WINDOW_SIZE must be a positive int; got -1"),
    (["MODEL.SWIN.NUM_SEM_BLOCKS", 0], r"MODEL.SWIN.NUM_SEM_BLOCKS must be an int >= 1 .* got 0"),
    (["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 0], r"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be a positive int .* got 0"),
    (["MODEL.SEM_SEG_HEAD.NAME", "MaskFormerHead"],
     r"SeMaskMaskFormer needs MODEL.SEM_SEG_HEAD.NAME 'BranchMaskFormerHead' .* got 'MaskFormerHead'"),
    (["MODEL.BACKBONE.NAME", "D2SwinTransformer"],
     r"needs a backbone that returns semantic priors \(MODEL.BACKBONE.NAME 'D2SeMaskSwinTransformer'\)"),
])
def test_bad_configs_name_the_key(opts, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(*opts)


def test_official_r50_base_config_is_refused_naming_the_semask_backbone():
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE.NAME 'D2SeMaskSwinTransformer'\); got 'build_resnet_backbone'"):
        build_from_official_path(R50)


def test_backbone_and_head_class_counts_must_agree():
    cfg = tiny_cfg()
    backbone = D2SeMaskSwinTransformer(num_classes=7, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                       window_size=4, sem_window_size=4)
    with pytest.raises(ValueError, match=rf"semantic priors have 7 classes but the head predicts {K}"):
        SeMaskMaskFormer.from_config(cfg, backbone=backbone)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    assert SeMaskMaskFormer.from_config(cfg, backbone=backbone)["backbone"] is backbone


def test_training_samples_need_sem_seg_labels_in_range():
    model = tiny_model().train()
    with pytest.raises(ValueError, match=r"batched_inputs\[1\] has no 'sem_seg'.*mask_former_semantic"):
        model([sample(0), sample(1, with_labels=False)])
    bad = sample(0)
    bad["sem_seg"][10, 10] = K
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {K}\)"):
        model([bad])


# ----------------------------------------------------------------------------- released models
def semask_manifests(parity_dir):
    paths = sorted((parity_dir / "semask").glob("manifest_semask_*.json"))
    assert len(paths) >= 2, f"expected the ADE20K and Cityscapes SeMask manifests in {parity_dir / 'semask'}"
    return [json.loads(p.read_text()) for p in paths]


def test_released_semask_models_have_our_keys_and_shapes(parity_dir):
    windows = {}
    for spec in semask_manifests(parity_dir):
        model = build_from_official_path(spec["config"])
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: list(v) for k, v in spec["keys"].items()}
        assert sorted(set(ours) - set(theirs)) == [], spec["config"]
        assert sorted(set(theirs) - set(ours)) == [], spec["config"]
        assert {k: (ours[k], v) for k, v in theirs.items() if ours[k] != v} == {}, spec["config"]
        windows[spec["config"].split("/")[1]] = [s.semantic_layer.window_size for s in model.backbone.layers]
    # the official rule: ADE20K's 150 classes attend globally in the last stage, Cityscapes never
    assert windows == {"ade20k": [12, 12, 12, None], "cityscapes": [7, 7, 7, 7]}


@pytest.mark.slow
def test_checkpoint_with_released_semask_keys_loads_cleanly(parity_dir, tmp_path):
    spec = next(s for s in semask_manifests(parity_dir) if "cityscapes" in s["config"])
    rng = np.random.default_rng(0)
    weights = OrderedDict(  # Swin's relative_position_index buffers are int64
        (k, np.zeros(shape, np.int64) if k.endswith("relative_position_index") else
         rng.standard_normal(shape, dtype=np.float32)) for k, shape in spec["keys"].items())
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, path)
    model = build_from_official_path(spec["config"], device="cpu")
    result = m2f.load_checkpoint(model, str(path))
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.renamed == {}
    key = "backbone.layers.2.semantic_layer.class_injection.0.mlp_cls_q.weight"
    assert torch.equal(model.state_dict()[key], torch.from_numpy(weights[key]))


# ----------------------------------------------------------------------------- inference
@pytest.mark.parametrize("opts", [[], ["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", False,
                                        "MODEL.MASK_FORMER.TEST.INSTANCE_ON", True]])
def test_fast_inference_is_bitwise_the_plain_model(opts):
    model = tiny_model(*opts).eval()
    assert type(model) is FastSeMaskMaskFormer
    with torch.no_grad():
        for stage in model.backbone.layers:  # a trained-like attention branch
            stage.semantic_layer.class_injection[0].gamma.fill_(0.5)
            stage.semantic_layer.class_injection[0].mlp_res.weight.normal_(0, 0.5)
    image = {"image": sample(5, 56, 72)["image"], "height": 40, "width": 50}
    with torch.no_grad():
        fast = model([image])[0]
        model.fast_inference = False
        assert not model.fast_inference
        plain = model([image])[0]
    assert set(fast) == set(plain) == ({"sem_seg"} if not opts else {"instances"})
    if not opts:
        assert fast["sem_seg"].shape == (K, 40, 50) and torch.equal(fast["sem_seg"], plain["sem_seg"])
    else:
        for field in ("pred_masks", "scores", "pred_classes", "pred_boxes"):
            a, b = getattr(fast["instances"], field), getattr(plain["instances"], field)
            assert torch.equal(getattr(a, "tensor", a), getattr(b, "tensor", b)), field


def test_swin_mask2former_checkpoint_loads_with_only_the_semantic_layers_missing(tmp_path):
    """Fine-tuning a Swin Mask2Former into SeMask: every key of the plain model loads, and what is
    missing is exactly the semantic layers."""
    semask = tiny_model()
    plain_cfg = tiny_cfg("MODEL.META_ARCHITECTURE", "MaskFormer", "MODEL.BACKBONE.NAME", "D2SwinTransformer",
                         "MODEL.SEM_SEG_HEAD.NAME", "MaskFormerHead")
    plain = m2f.build_model(plain_cfg)
    path = tmp_path / "swin_m2f.pth"
    torch.save({"model": plain.state_dict()}, path)
    result = m2f.load_checkpoint(semask, str(path))
    assert result.unexpected_keys == []
    semantic = sorted(k for k in semask.state_dict() if ".semantic_layer." in k)
    assert sorted(result.missing_keys) == semantic and len(semantic) == 4 * 11
    key = "backbone.layers.2.blocks.1.attn.qkv.weight"
    assert torch.equal(semask.state_dict()[key], plain.state_dict()[key])
