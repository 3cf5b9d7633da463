"""Backbones: checkpoint key compatibility with the official models, shapes, freezing, and a
slow dense re-implementation of (shifted) window attention."""
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from fvcore.common.config import CfgNode
from torch import nn
from torch.nn import functional as F

from mask2former.layers import FrozenBatchNorm2d, ShapeSpec
from mask2former.modeling.backbone import (
    Backbone,
    D2SwinTransformer,
    build_backbone,
    build_resnet_backbone,
)
from mask2former.modeling.backbone.swin import (
    PatchMerging,
    SwinTransformerBlock,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
)
from mask2former.utils.registry import BACKBONE_REGISTRY
from tests.conftest import PARITY

# the parity_dir fixture skips without ../shared, and fails under CI=true
needs_parity = pytest.mark.usefixtures("parity_dir")


def load_cfg(name: str) -> CfgNode:
    """Full config dump shipped with the parity data (official Detectron2 + Mask2Former keys)."""
    try:
        from mask2former.config import get_cfg  # the project's own loader, when available
    except ImportError:
        get_cfg = None
    path = PARITY / f"tiny_{name}.yaml"
    if get_cfg is not None:
        cfg = get_cfg()
        cfg.merge_from_file(str(path))
        return cfg
    return CfgNode(yaml.safe_load(path.read_text()))


def backbone_keys_from_manifest(name: str):
    keys = json.loads((PARITY / f"manifest_{name}.json").read_text())["keys"]
    return {k[len("backbone."):]: tuple(v) for k, v in keys.items() if k.startswith("backbone.")}


def backbone_keys_from_pickle(name: str):
    with open(PARITY / f"tiny_{name}.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    return {k[len("backbone."):]: torch.as_tensor(v) for k, v in model.items() if k.startswith("backbone.")}


def shapes(module: nn.Module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def resnet_cfg(**resnets) -> CfgNode:
    """The repository's R50 COCO panoptic config (no parity data needed) with RESNETS overrides."""
    from mask2former.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "configs/coco/panoptic-segmentation/"
                            "maskformer2_R50_bs16_50ep.yaml"))
    cfg.defrost()
    full = dict(DEPTH=50, STEM_OUT_CHANNELS=64, RES2_OUT_CHANNELS=256, WIDTH_PER_GROUP=64, NORM="FrozenBN")
    full.update(resnets)
    for k, v in full.items():
        cfg.MODEL.RESNETS[k] = v
    return cfg


def swin_cfg(**swin) -> CfgNode:
    cfg = load_cfg("swin_semantic")
    cfg.defrost()
    for k, v in swin.items():
        cfg.MODEL.SWIN[k] = v
    return cfg


SWIN_FULL = {
    "coco_panoptic_swinL": dict(EMBED_DIM=192, DEPTHS=[2, 2, 18, 2], NUM_HEADS=[6, 12, 24, 48],
                                WINDOW_SIZE=12, PRETRAIN_IMG_SIZE=384),
    "ade20k_semantic_swinT": dict(EMBED_DIM=96, DEPTHS=[2, 2, 6, 2], NUM_HEADS=[3, 6, 12, 24],
                                  WINDOW_SIZE=7, PRETRAIN_IMG_SIZE=224),
}


# ----------------------------------------------------------------------------------- (a) manifests
@needs_parity
@pytest.mark.parametrize(
    "manifest, resnets",
    [
        ("coco_panoptic_R50", dict(DEPTH=50, NORM="FrozenBN")),
        ("cityscapes_instance_R101", dict(DEPTH=101, NORM="SyncBN")),
    ],
)
def test_resnet_keys_match_official_manifest(manifest, resnets):
    cfg = resnet_cfg(**resnets)
    model = build_backbone(cfg)
    assert shapes(model) == backbone_keys_from_manifest(manifest)
    # The same model from plain kwargs (no cfg) has the same layout.
    assert isinstance(model, Backbone)
    assert model.output_shape() == {
        "res2": ShapeSpec(channels=256, stride=4), "res3": ShapeSpec(channels=512, stride=8),
        "res4": ShapeSpec(channels=1024, stride=16), "res5": ShapeSpec(channels=2048, stride=32),
    }


@needs_parity
@pytest.mark.parametrize("manifest", sorted(SWIN_FULL))
def test_swin_keys_match_official_manifest(manifest):
    cfg = swin_cfg(**SWIN_FULL[manifest])
    with torch.device("meta"):  # Swin-L is ~200M parameters; only shapes are needed
        model = build_backbone(cfg)
    assert shapes(model) == backbone_keys_from_manifest(manifest)
    idx = model.state_dict()["layers.0.blocks.0.attn.relative_position_index"]
    assert idx.dtype == torch.int64


def test_swin_kwargs_equal_cfg_layout():
    kwargs = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7)
    a = D2SwinTransformer(**kwargs)
    assert shapes(a)["norm3.weight"] == (128,)
    assert a.size_divisibility == 32
    assert {k: (v.channels, v.stride) for k, v in a.output_shape().items()} == {
        "res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32)}


# -------------------------------------------------------------------------------- (b) tiny pickles
@needs_parity
@pytest.mark.parametrize("name", ["panoptic", "swin_semantic"])
def test_tiny_checkpoint_loads_strictly(name):
    cfg = load_cfg(name)
    model = build_backbone(cfg).eval()
    weights = backbone_keys_from_pickle(name)
    assert shapes(model) == {k: tuple(v.shape) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    for k, spec in model.output_shape().items():
        assert out[k].shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)
        assert torch.isfinite(out[k]).all()


# ------------------------------------------------------------------------ (c) odd input sizes
def _ceil_div(a, b):
    return -(-a // b)


def test_resnet_odd_input_shapes():
    model = build_resnet_backbone(resnet_cfg(), ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 67, 93))
    # stem: conv/2 then pool/2, then a /2 conv per stage (all with "same"-style padding)
    h, w = _ceil_div(_ceil_div(67, 2), 2), _ceil_div(_ceil_div(93, 2), 2)
    expected = {}
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        expected[name] = (2, 256 * 2**i, h, w)
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert expected["res5"][2:] == (3, 3)


@pytest.mark.parametrize("window", [7, 12])
@pytest.mark.parametrize("hw", [(67, 93), (32, 32), (130, 45)])
def test_swin_odd_input_shapes(window, hw):
    model = D2SwinTransformer(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                              window_size=window).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    h, w = _ceil_div(hw[0], 4), _ceil_div(hw[1], 4)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        assert tuple(out[name].shape) == (2, 16 * 2**i, h, w)
        assert out[name].is_contiguous() and torch.isfinite(out[name]).all()
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)


def test_non_4d_input_raises():
    resnet = build_resnet_backbone(resnet_cfg(DEPTH=18, RES2_OUT_CHANNELS=64), ShapeSpec(channels=3))
    swin = D2SwinTransformer(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
    for model in (resnet, swin):
        with pytest.raises(ValueError, match="N, C, H, W"):
            model(torch.randn(3, 32, 32))


def test_out_features_subset():
    cfg = resnet_cfg(OUT_FEATURES=["res2", "res3", "res4"])
    model = build_backbone(cfg)
    assert not any(k.startswith("res5") for k in model.state_dict())  # unused stage not built
    assert set(model(torch.randn(1, 3, 64, 64))) == {"res2", "res3", "res4"}
    swin = D2SwinTransformer(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                             out_features=["res3", "res5"])
    assert "norm0.weight" in swin.state_dict()  # official keeps all output norms
    assert set(swin(torch.randn(1, 3, 64, 64))) == {"res3", "res5"}


def test_unknown_backbone_name_lists_registered():
    cfg = resnet_cfg()
    cfg.MODEL.BACKBONE.NAME = "NoSuchBackbone"
    with pytest.raises(KeyError, match="build_resnet_backbone.*|D2SwinTransformer"):
        build_backbone(cfg)
    assert "D2SwinTransformer" in BACKBONE_REGISTRY and "build_resnet_backbone" in BACKBONE_REGISTRY


# ------------------------------------------------------------------------------- (d) FREEZE_AT
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    cfg = resnet_cfg(DEPTH=50, NORM="BN")
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    model = build_backbone(cfg)
    frozen_parts = (["stem"] + [f"res{i}" for i in range(2, 6)])[:freeze_at]
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen_parts), name
    for name, m in model.named_modules():
        if name.endswith("norm"):
            frozen = name.split(".")[0] in frozen_parts
            assert isinstance(m, FrozenBatchNorm2d) == frozen, name
            assert isinstance(m, nn.BatchNorm2d) == (not frozen), name
    # Freezing keeps the checkpoint layout except for BN's num_batches_tracked.
    unfrozen = shapes(build_backbone(resnet_cfg(DEPTH=50, NORM="BN")))
    frozen_keys = shapes(model)
    dropped = {k for k in unfrozen if k not in frozen_keys}
    assert all(k.endswith("num_batches_tracked") for k in dropped)


# ---------------------------------------------------------------------------- (e) other depths
@pytest.mark.parametrize("depth, blocks", [(18, [2, 2, 2, 2]), (34, [3, 4, 6, 3]),
                                           (101, [3, 4, 23, 3]), (152, [3, 8, 36, 3])])
def test_resnet_depths(depth, blocks):
    res2 = 64 if depth < 50 else 256
    model = build_backbone(resnet_cfg(DEPTH=depth, RES2_OUT_CHANNELS=res2))
    for i, n in enumerate(blocks):
        assert len(getattr(model, f"res{i + 2}")) == n
    sd = model.state_dict()
    if depth < 50:
        assert "res2.0.conv3.weight" not in sd and "res2.0.shortcut.weight" not in sd
        assert sd["res3.0.shortcut.weight"].shape == (128, 64, 1, 1)
    channels = {k: v.channels for k, v in model.output_shape().items()}
    assert channels == {f"res{i + 2}": res2 * 2**i for i in range(4)}
    out = model(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, res2 * 8, 2, 2)


def test_resnet_variants():
    # ResNeXt 32x4d: grouped 3x3 conv with 128 channels in res2
    m = build_backbone(resnet_cfg(NUM_GROUPS=32, WIDTH_PER_GROUP=4, STRIDE_IN_1X1=True))
    assert m.res2[0].conv2.groups == 32 and m.res2[0].conv2.weight.shape == (128, 4, 3, 3)
    assert m.res3[0].conv1.stride == (2, 2) and m.res3[0].conv2.stride == (1, 1)
    # Dilated res5 keeps stride 16; multi-grid sets per-block dilation
    m = build_backbone(resnet_cfg(RES5_DILATION=2, RES5_MULTI_GRID=[1, 2, 4]))
    assert m.output_shape()["res5"].stride == 16
    assert [b.conv2.dilation[0] for b in m.res5] == [2, 4, 8]
    assert m(torch.randn(1, 3, 64, 64))["res5"].shape[-2:] == (4, 4)
    m = build_backbone(resnet_cfg(RES4_DILATION=2, RES5_DILATION=4))
    assert m.output_shape()["res4"].stride == 8
    # DeepLab stem: three 3x3 convs of widths out/2, out/2, out
    m = build_backbone(resnet_cfg(STEM_TYPE="deeplab", STEM_OUT_CHANNELS=128))
    assert [tuple(getattr(m.stem, f"conv{i}").weight.shape) for i in (1, 2, 3)] == [
        (64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert m(torch.randn(1, 3, 67, 93))["res2"].shape == (1, 256, 17, 24)
    for norm in ["GN", "SyncBN"]:
        m = build_backbone(resnet_cfg(NORM=norm)).eval()
        assert m(torch.randn(1, 3, 32, 32))["res5"].shape == (1, 2048, 1, 1)


# ------------------------------------------------------------------- (g) Swin numerics vs. slow
def test_relative_position_index_formula():
    idx = relative_position_index((3, 4))
    pos = [(y, x) for y in range(3) for x in range(4)]
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            assert idx[i, j] == (yi - yj + 2) * 7 + (xi - xj + 3)


def test_patch_merging_order_and_padding():
    pm = PatchMerging(dim=1)
    pm.norm, pm.reduction = nn.Identity(), nn.Identity()
    H, W = 3, 5
    x = torch.arange(H * W, dtype=torch.float32).view(1, H * W, 1)
    y = pm(x, H, W).view(2, 3, 4)
    grid = F.pad(torch.arange(H * W, dtype=torch.float32).view(H, W), (0, 1, 0, 1))
    for i in range(2):
        for j in range(3):
            expect = [grid[2 * i, 2 * j], grid[2 * i + 1, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j + 1]]
            assert y[i, j].tolist() == torch.stack(expect).tolist()


def dense_window_attention(attn: WindowAttention, x, H, W, ws, shift):
    """Reference: attention over all tokens of the padded (Hp, Wp) map with an explicit (L, L)
    bias: -inf unless two tokens share a (shifted) window and, when shifted, a wrap-around region.
    x: (B, Hp, Wp, C) already padded; returns (B, Hp, Wp, C)."""
    B, Hp, Wp, C = x.shape
    nh = attn.num_heads
    ys, xs = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    ry, rx = (ys - shift) % Hp, (xs - shift) % Wp  # coordinates after rolling by -shift
    win = (ry // ws) * (Wp // ws) + rx // ws

    def band(r, n):
        return torch.where(r < n - ws, 0, torch.where(r < n - shift, 1, 2)) if shift else torch.zeros_like(r)

    region = band(ry, Hp) * 3 + band(rx, Wp)
    win, region, ry, rx = (t.flatten() for t in (win, region, ry, rx))
    table = attn.relative_position_bias_table  # ((2ws-1)^2, nH)
    dy = (ry % ws)[:, None] - (ry % ws)[None, :]
    dx = (rx % ws)[:, None] - (rx % ws)[None, :]
    bias = table[(dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)].permute(2, 0, 1)  # nH, L, L
    same_win = win[:, None] == win[None, :]
    bias = bias + torch.where(region[:, None] == region[None, :], 0.0, -100.0)
    bias = bias.masked_fill(~same_win, float("-inf"))
    qkv = attn.qkv(x.view(B, -1, C)).view(B, -1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) * (C // nh) ** -0.5 + bias, dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, Hp, Wp, C)
    return attn.proj(out)


@pytest.mark.parametrize("ws, shift, H, W", [(4, 0, 8, 12), (4, 2, 8, 12), (7, 3, 10, 13), (3, 1, 5, 9)])
def test_swin_block_matches_dense_reference(ws, shift, H, W):
    torch.manual_seed(0)
    C, heads = 8, 2
    blk = SwinTransformerBlock(C, heads, window_size=ws, shift_size=shift).double().eval()
    for p in blk.parameters():  # non-trivial affine/bias values
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    mask = shifted_window_mask(Hp, Wp, ws, max(shift, 1)).double()
    with torch.no_grad():
        out = blk(x, H, W, mask)
        # reference
        y = F.pad(blk.norm1(x).view(2, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
        y = dense_window_attention(blk.attn, y, H, W, ws, shift)[:, :H, :W].reshape(2, H * W, C)
        y = x + y
        ref = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_swin_use_checkpoint_same_result():
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, drop_path_rate=0.0)
    a = D2SwinTransformer(**kwargs)
    b = D2SwinTransformer(**kwargs, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 45, 61, requires_grad=True)
    out_a, out_b = a(x)["res5"], b(x)["res5"]
    torch.testing.assert_close(out_a, out_b)
    ga = torch.autograd.grad(out_a.sum(), x)[0]
    gb = torch.autograd.grad(out_b.sum(), x)[0]
    torch.testing.assert_close(ga, gb)


def test_swin_drop_path_schedule_and_ape():
    m = D2SwinTransformer(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                          drop_path_rate=0.7, ape=True, pretrain_img_size=64)
    rates = [0.0 if isinstance(b.drop_path, nn.Identity) else b.drop_path.drop_prob
             for layer in m.layers for b in layer.blocks]
    assert rates == pytest.approx([0.1 * i for i in range(8)])
    assert m.state_dict()["absolute_pos_embed"].shape == (1, 16, 16, 16)
    assert m.eval()(torch.randn(1, 3, 50, 70))["res2"].shape == (1, 16, 13, 18)
