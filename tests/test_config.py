"""Tests of the config system and of the configs/ model zoo."""
import json
from pathlib import Path

import pytest
from fvcore.common.config import CfgNode as FvCfgNode

from mask2former.config import (
    CfgNode,
    ConfigKeyError,
    ConfigTypeError,
    add_deeplab_config,
    add_maskformer2_config,
    configurable,
    get_cfg,
)

from tests.conftest import PARITY_MANIFESTS, REPO, require_shared

CONFIGS = REPO / "configs"


def _norm(v):
    # yacs keeps the default's container type (tuple vs list); compare contents only.
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = _norm(v)
    return out


def _load(rel_path):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS.parent / rel_path))
    return cfg


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


# ----------------------------------------------------------------------------- model zoo files
_SWIN_COCO = ["tiny_bs16_50ep", "small_bs16_50ep", "base_384_bs16_50ep",
              "base_IN21k_384_bs16_50ep", "large_IN21k_384_bs16_100ep"]
_SWIN_CITYSCAPES = ["tiny_bs16_90k", "small_bs16_90k", "base_IN21k_384_bs16_90k",
                    "large_IN21k_384_bs16_90k"]
# task dir -> (Base file, R50/R101 files, swin variants); the official configs/ tree minus video.
OFFICIAL_TREE = {
    "coco/panoptic-segmentation": ("Base-COCO-PanopticSegmentation",
                                   ["maskformer2_R50_bs16_50ep", "maskformer2_R101_bs16_50ep"],
                                   _SWIN_COCO),
    "coco/instance-segmentation": ("Base-COCO-InstanceSegmentation",
                                   ["maskformer2_R50_bs16_50ep", "maskformer2_R101_bs16_50ep"],
                                   _SWIN_COCO),
    "ade20k/semantic-segmentation": (
        "Base-ADE20K-SemanticSegmentation",
        ["maskformer2_R50_bs16_160k", "maskformer2_R101_bs16_90k"],
        ["tiny_bs16_160k", "small_bs16_160k", "base_384_bs16_160k_res640",
         "base_IN21k_384_bs16_160k_res640", "large_IN21k_384_bs16_160k_res640"]),
    "ade20k/panoptic-segmentation": ("Base-ADE20K-PanopticSegmentation",
                                     ["maskformer2_R50_bs16_160k"], ["large_IN21k_384_bs16_160k"]),
    "ade20k/instance-segmentation": ("Base-ADE20K-InstanceSegmentation",
                                     ["maskformer2_R50_bs16_160k"], ["large_IN21k_384_bs16_160k"]),
    "cityscapes/semantic-segmentation": ("Base-Cityscapes-SemanticSegmentation",
                                         ["maskformer2_R50_bs16_90k", "maskformer2_R101_bs16_90k"],
                                         _SWIN_CITYSCAPES),
    "cityscapes/instance-segmentation": ("Base-Cityscapes-InstanceSegmentation",
                                         ["maskformer2_R50_bs16_90k", "maskformer2_R101_bs16_90k"],
                                         _SWIN_CITYSCAPES),
    "cityscapes/panoptic-segmentation": ("Base-Cityscapes-PanopticSegmentation",
                                         ["maskformer2_R50_bs16_90k", "maskformer2_R101_bs16_90k"],
                                         _SWIN_CITYSCAPES),
    "mapillary-vistas/semantic-segmentation": ("Base-MapillaryVistas-SemanticSegmentation",
                                               ["maskformer2_R50_bs16_300k"],
                                               ["large_IN21k_384_bs16_300k"]),
    "mapillary-vistas/panoptic-segmentation": ("Base-MapillaryVistas-PanopticSegmentation",
                                               ["maskformer_R50_bs16_300k"],
                                               ["large_IN21k_384_bs16_300k"]),
}
OFFICIAL_FILES = sorted(
    f"configs/{d}/{name}.yaml"
    for d, (base, resnets, swins) in OFFICIAL_TREE.items()
    for name in [base, *resnets, *(f"swin/maskformer2_swin_{s}" for s in swins)]
)


def test_official_tree_is_complete():
    assert len(OFFICIAL_FILES) == 57
    missing = [p for p in OFFICIAL_FILES if not (REPO / p).is_file()]
    assert not missing


def _family(path: str):
    """(META_ARCHITECTURE, SEM_SEG_HEAD.NAME) of a config by the system it belongs to."""
    name = Path(path).name
    if "kmax" in name:  # configs/*/kmax_*.yaml, configs/synthetic/panoptic_kmax.yaml
        return "kMaXDeepLab", "kMaXDeepLabHead"
    if "semask" in name:
        return "SeMaskMaskFormer", "BranchMaskFormerHead"
    return "MaskFormer", "MaskFormerHead"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in CONFIGS.rglob("*.yaml")))
def test_every_config_loads(path):
    cfg = _load(path)
    assert cfg.VERSION == 2
    if not Path(path).name.startswith("Base-"):
        assert (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.SEM_SEG_HEAD.NAME) == _family(path)
        assert cfg.INPUT.FORMAT == "RGB"


_SWIN_L = {
    "MODEL.BACKBONE.NAME": "D2SwinTransformer",
    "MODEL.SWIN.EMBED_DIM": 192,
    "MODEL.SWIN.DEPTHS": [2, 2, 18, 2],
    "MODEL.SWIN.NUM_HEADS": [6, 12, 24, 48],
    "MODEL.SWIN.WINDOW_SIZE": 12,
    "MODEL.SWIN.PRETRAIN_IMG_SIZE": 384,
    "MODEL.SWIN.DROP_PATH_RATE": 0.3,
    "MODEL.WEIGHTS": "swin_large_patch4_window12_384_22k.pkl",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
}
SPOT_CHECKS = {
    "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml": {
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/torchvision/R-50.pkl",
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.STEM_TYPE": "basic",
        "MODEL.RESNETS.RES5_MULTI_GRID": [1, 1, 1],
        "MODEL.RESNETS.NORM": "FrozenBN",
        "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 133,
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": "MSDeformAttnPixelDecoder",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 6,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
        "MODEL.MASK_FORMER.DEC_LAYERS": 10,
        "MODEL.MASK_FORMER.DROPOUT": 0.0,
        "MODEL.MASK_FORMER.CLASS_WEIGHT": 2.0,
        "MODEL.MASK_FORMER.MASK_WEIGHT": 5.0,
        "MODEL.MASK_FORMER.DICE_WEIGHT": 5.0,
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.8,
        "SOLVER.MAX_ITER": 368750,
        "SOLVER.STEPS": [327778, 355092],
        "SOLVER.BASE_LR": 0.0001,
        "SOLVER.WARMUP_ITERS": 10,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01,
        "INPUT.DATASET_MAPPER_NAME": "coco_panoptic_lsj",
        "INPUT.IMAGE_SIZE": 1024,
        "DATASETS.TEST": ["coco_2017_val_panoptic_with_sem_seg"],
    },
    "configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml": {
        **_SWIN_L,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 200,
        "SOLVER.MAX_ITER": 737500,
        "SOLVER.STEPS": [655556, 710184],
    },
    "configs/coco/instance-segmentation/swin/maskformer2_swin_base_384_bs16_50ep.yaml": {
        "MODEL.SWIN.EMBED_DIM": 128,
        "MODEL.SWIN.NUM_HEADS": [4, 8, 16, 32],
        "MODEL.WEIGHTS": "swin_base_patch4_window12_384.pkl",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 80,
        "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": False,
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON": True,
        "DATASETS.TRAIN": ["coco_2017_train"],
    },
    "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml": {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 150,
        "SOLVER.MAX_ITER": 160000,
        "SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR",
        "SOLVER.WARMUP_ITERS": 0,
        "INPUT.MIN_SIZE_TRAIN": [int(x * 0.1 * 512) for x in range(5, 21)],
        "INPUT.CROP.SIZE": [512, 512],
        "INPUT.SIZE_DIVISIBILITY": 512,
        "TEST.AUG.MAX_SIZE": 3584,
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON": False,
    },
    "configs/ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml": {
        "MODEL.RESNETS.DEPTH": 101,
        "MODEL.RESNETS.NORM": "SyncBN",
        "MODEL.WEIGHTS": "R-101.pkl",
        "SOLVER.MAX_ITER": 160000,  # sic: the official file inherits 160k
    },
    "configs/ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml": {
        "MODEL.SWIN.EMBED_DIM": 96,
        "MODEL.SWIN.DEPTHS": [2, 2, 6, 2],
        "MODEL.SWIN.WINDOW_SIZE": 7,
        "MODEL.SWIN.PRETRAIN_IMG_SIZE": 224,
        "MODEL.WEIGHTS": "swin_tiny_patch4_window7_224.pkl",
    },
    "configs/ade20k/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml": {
        **_SWIN_L,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
        "INPUT.MIN_SIZE_TEST": 640,
        "INPUT.MAX_SIZE_TRAIN": 2560,
        "INPUT.CROP.SIZE": [640, 640],
        "INPUT.SIZE_DIVISIBILITY": 640,
        "TEST.AUG.MIN_SIZES": [320, 480, 640, 800, 960, 1120],
    },
    "configs/ade20k/instance-segmentation/maskformer2_R50_bs16_160k.yaml": {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 100,
        "INPUT.DATASET_MAPPER_NAME": "mask_former_instance",
        "INPUT.MIN_SIZE_TRAIN": [int(x * 0.1 * 640) for x in range(5, 21)],
    },
    "configs/cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml": {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19,
        "MODEL.RESNETS.NORM": "SyncBN",
        "SOLVER.MAX_ITER": 90000,
        "INPUT.CROP.SIZE": [512, 1024],
        "INPUT.SIZE_DIVISIBILITY": -1,
        "INPUT.MAX_SIZE_TEST": 2048,
    },
    "configs/cityscapes/instance-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml": {
        **_SWIN_L,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 8,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 200,
        "DATASETS.TEST": ["cityscapes_fine_instance_seg_val"],
    },
    "configs/cityscapes/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml": {
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
    },
    "configs/mapillary-vistas/panoptic-segmentation/maskformer_R50_bs16_300k.yaml": {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 65,
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": 65,
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.0,
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON": False,
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
        "SOLVER.MAX_ITER": 300000,
        "TEST.EVAL_PERIOD": 0,
        "DATALOADER.NUM_WORKERS": 10,
        "INPUT.CROP.SIZE": [1024, 1024],
        "INPUT.MAX_SIZE_TRAIN": 8192,
    },
}


@pytest.mark.parametrize("path", sorted(SPOT_CHECKS))
def test_spot_check_official_values(path):
    cfg = _load(path)
    got = {k: _norm(_get(cfg, k)) for k in SPOT_CHECKS[path]}
    assert got == SPOT_CHECKS[path]


# ----------------------------------------------------------------------------- parity data
EXPECTED_KIND = {  # manifest config -> what the official model is
    "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml": ("resnet", 50, 133),
    "configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml": ("resnet", 50, 80),
    "configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml":
        ("swin", 192, 133),
    "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml": ("resnet", 50, 150),
    "configs/ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml":
        ("swin", 96, 150),
    "configs/cityscapes/instance-segmentation/maskformer2_R101_bs16_90k.yaml": ("resnet", 101, 8),
    "configs/mapillary-vistas/panoptic-segmentation/maskformer_R50_bs16_300k.yaml":
        ("resnet", 50, 65),
}


@pytest.mark.parametrize("name", PARITY_MANIFESTS)
def test_manifest_config_matches_model_kind(parity_dir, name):
    data = json.loads((parity_dir / f"manifest_{name}.json").read_text())
    cfg = _load(data["config"])
    keys = data["keys"]
    m = cfg.MODEL

    # What the official state dict implies about the config.
    pred = "sem_seg_head.predictor."
    assert m.SEM_SEG_HEAD.NUM_CLASSES == keys[pred + "class_embed.weight"][0] - 1
    assert m.MASK_FORMER.NUM_OBJECT_QUERIES == keys[pred + "query_feat.weight"][0]
    assert m.MASK_FORMER.HIDDEN_DIM == keys[pred + "query_feat.weight"][1]
    assert m.SEM_SEG_HEAD.MASK_DIM == keys["sem_seg_head.pixel_decoder.mask_features.weight"][0]
    n_dec = {k.split(".")[3] for k in keys if "transformer_cross_attention_layers." in k}
    assert m.MASK_FORMER.DEC_LAYERS == len(n_dec) + 1  # +1: prediction from the query init
    n_enc = {k.split(".")[5] for k in keys if "pixel_decoder.transformer.encoder.layers." in k}
    assert m.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS == len(n_enc)
    if "backbone.patch_embed.proj.weight" in keys:
        assert m.BACKBONE.NAME == "D2SwinTransformer"
        assert m.SWIN.EMBED_DIM == keys["backbone.patch_embed.proj.weight"][0]
        depths = [len({k.split(".")[4] for k in keys if k.startswith(f"backbone.layers.{i}.blocks.")})
                  for i in range(4)]
        assert list(m.SWIN.DEPTHS) == depths
    else:
        assert m.BACKBONE.NAME == "build_resnet_backbone"
        n_res4 = len({k.split(".")[2] for k in keys if k.startswith("backbone.res4.")})
        assert m.RESNETS.DEPTH == {6: 50, 23: 101}[n_res4]

    # every manifest's config is listed: a new one cannot skip this check silently
    kind, size, num_classes = EXPECTED_KIND[data["config"]]
    assert m.SEM_SEG_HEAD.NUM_CLASSES == num_classes
    assert (m.SWIN.EMBED_DIM if kind == "swin" else m.RESNETS.DEPTH) == size


# What the tiny parity models changed relative to their official config (parity README).
_TINY_COMMON = {
    "MODEL.DEVICE", "MODEL.WEIGHTS",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "MODEL.SEM_SEG_HEAD.MASK_DIM",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "MODEL.MASK_FORMER.DEC_LAYERS",
}
_ADE_R50 = "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
TINY_BASES = {
    "panoptic": ("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
                 {"MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD",
                  "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD"}),
    "instance": ("configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml", set()),
    "semantic": (_ADE_R50, set()),
    "swin_semantic": ("configs/ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml",
                      {"MODEL.SWIN.EMBED_DIM", "MODEL.SWIN.DEPTHS", "MODEL.SWIN.NUM_HEADS"}),
    "maskformer_semantic": (_ADE_R50, {"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME",
                                       "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
                                       "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE"}),
}


_MP_FORMER_KEYS = {"MODEL.DN.NUM_DN", "MODEL.DN.NOISE_SCALE", "SOLVER.INSTANT_DROP", "SOLVER.DROP_EP"} | {
    f"MODEL.MASK_FORMER.{k}" for k in ("LAST_Q_RATIO", "DN_MODE", "HEAD_DN", "ALL_LY_DN", "DN_RATIO", "DN_NO_LB",
                                       "LB_NOISE_RATIO")}
_SEMASK_KEYS = {"MODEL.SWIN.SEM_WINDOW_SIZE", "MODEL.SWIN.NUM_SEM_BLOCKS", "MODEL.MASK_FORMER.CATE_WEIGHT"}
_KMAX_SECTIONS = ("MODEL.KMAX_DEEPLAB.", "MODEL.CONVNEXT.")


@pytest.mark.parametrize("name", sorted(TINY_BASES))
def test_parity_dump_loads(parity_dir, name):
    """A full Detectron2 dump has no key we lack, and every value survives merging."""
    import yaml

    path = require_shared(parity_dir / f"tiny_{name}.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    dumped, ours = _flat(yaml.safe_load(path.read_text())), _flat(cfg)
    assert {k: ours[k] for k in dumped} == dumped
    # the descendants' keys (MP-Former's, SeMask's, kMaX-DeepLab's) are the only ones Mask2Former's dumps lack
    lacking = {k for k in ours if k not in dumped and not k.startswith(_KMAX_SECTIONS)}
    assert lacking == _MP_FORMER_KEYS | _SEMASK_KEYS


def test_every_tiny_config_is_listed(parity_dir):
    assert sorted(p.stem[len("tiny_"):] for p in parity_dir.glob("tiny_*.yaml")) == sorted(TINY_BASES)


@pytest.mark.parametrize("name", sorted(TINY_BASES))
def test_parity_dump_agrees_with_our_config(parity_dir, name):
    """Every key the tiny model did not change (SOLVER, INPUT, TEST, ...) equals ours."""
    path = require_shared(parity_dir / f"tiny_{name}.yaml")
    official = get_cfg()
    official.merge_from_file(str(path))
    ours_path, extra_allowed = TINY_BASES[name]
    a, b = _flat(official), _flat(_load(ours_path))
    differing = {k for k in a if a[k] != b[k]}
    unexpected = differing - _TINY_COMMON - extra_allowed
    assert not unexpected, {k: (a[k], b[k]) for k in unexpected}


# ----------------------------------------------------------------------------- behaviour
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_in_file(tmp_path):
    f = _write(tmp_path / "x.yaml", "MODEL:\n  MASK_FORMER:\n    DEC_LAYER: 3\n")
    with pytest.raises(KeyError) as e:
        get_cfg().merge_from_file(str(f))
    assert isinstance(e.value, ConfigKeyError)
    msg = str(e.value)
    assert "'MODEL.MASK_FORMER.DEC_LAYER'" in msg
    assert str(f) in msg
    assert "did you mean 'MODEL.MASK_FORMER.DEC_LAYERS'?" in msg


def test_unknown_key_names_the_base_file_it_came_from(tmp_path):
    base = _write(tmp_path / "base.yaml", "SOLVER:\n  MAX_ITERS: 10\n")
    child = _write(tmp_path / "sub" / "child.yaml", "_BASE_: ../base.yaml\nSOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(ConfigKeyError) as e:
        get_cfg().merge_from_file(str(child))
    assert str(base) in str(e.value) and "'SOLVER.MAX_ITERS'" in str(e.value)
    assert "'SOLVER.MAX_ITER'" in str(e.value)


def test_unknown_section_suggests_section(tmp_path):
    f = _write(tmp_path / "x.yaml", "MODEL:\n  MASKFORMER:\n    DEC_LAYERS: 3\n")
    with pytest.raises(ConfigKeyError, match=r"'MODEL\.MASKFORMER'.*did you mean 'MODEL\.MASK_FORMER'"):
        get_cfg().merge_from_file(str(f))


def test_wrong_type_in_file(tmp_path):
    f = _write(tmp_path / "x.yaml", "SOLVER:\n  MAX_ITER: lots\n")
    with pytest.raises(ValueError) as e:
        get_cfg().merge_from_file(str(f))
    assert isinstance(e.value, ConfigTypeError)
    assert "'SOLVER.MAX_ITER'" in str(e.value) and str(f) in str(e.value)


def test_section_replaced_by_value_is_a_type_error(tmp_path):
    f = _write(tmp_path / "x.yaml", "MODEL:\n  SWIN: 3\n")
    with pytest.raises(ConfigTypeError, match="MODEL.SWIN"):
        get_cfg().merge_from_file(str(f))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no/such/config.yaml"):
        get_cfg().merge_from_file("no/such/config.yaml")


def test_missing_base_names_including_file(tmp_path):
    child = _write(tmp_path / "child.yaml", "_BASE_: gone.yaml\n")
    with pytest.raises(FileNotFoundError) as e:
        get_cfg().merge_from_file(str(child))
    assert str(tmp_path / "gone.yaml") in str(e.value) and str(child) in str(e.value)


def test_base_is_relative_to_including_file(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "base.yaml", "SOLVER:\n  MAX_ITER: 7\n  BASE_LR: 0.5\n")
    _write(tmp_path / "a" / "b" / "mid.yaml", "_BASE_: ../base.yaml\nSOLVER:\n  MAX_ITER: 8\n")
    child = _write(tmp_path / "a" / "b" / "c" / "child.yaml", "_BASE_: ../mid.yaml\nSEED: 3\n")
    monkeypatch.chdir(tmp_path)  # not the config's directory
    cfg = get_cfg()
    cfg.merge_from_file(str(child.relative_to(tmp_path)))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SEED) == (8, 0.5, 3)
    assert CfgNode.load_yaml_with_base(str(child)) == {"SOLVER": {"MAX_ITER": 8, "BASE_LR": 0.5},
                                                      "SEED": 3}


def test_circular_base(tmp_path):
    _write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ValueError, match="Circular"):
        get_cfg().merge_from_file(str(tmp_path / "a.yaml"))


def test_official_style_unsafe_yaml(tmp_path):
    # The official configs compute MIN_SIZE_TRAIN with a python/eval tag.
    f = _write(tmp_path / "x.yaml", 'INPUT:\n  MIN_SIZE_TRAIN: !!python/object/apply:eval '
                                    '["[int(x * 0.1 * 512) for x in range(5, 21)]"]\n')
    cfg = get_cfg()
    cfg.merge_from_file(str(f))
    assert list(cfg.INPUT.MIN_SIZE_TRAIN)[:3] == [256, 307, 358]
    with pytest.raises(ValueError, match="unsafe"):
        get_cfg().merge_from_file(str(f), allow_unsafe=False)


def test_merge_from_list():
    cfg = get_cfg()
    cfg.merge_from_list([
        "SOLVER.BASE_LR", "0.001",
        "MODEL.WEIGHTS", "/tmp/model_final.pkl",
        "INPUT.MIN_SIZE_TRAIN", "(640, 672)",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True",
        "SOLVER.MAX_ITER", 5,
        "SOLVER.WARMUP_FACTOR", 1,  # int widened to the float default
    ])
    assert cfg.SOLVER.BASE_LR == 0.001 and cfg.MODEL.WEIGHTS == "/tmp/model_final.pkl"
    assert cfg.INPUT.MIN_SIZE_TRAIN == (640, 672) and cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON is True
    assert cfg.SOLVER.MAX_ITER == 5
    assert cfg.SOLVER.WARMUP_FACTOR == 1.0 and isinstance(cfg.SOLVER.WARMUP_FACTOR, float)


def test_merge_from_list_errors():
    cfg = get_cfg()
    with pytest.raises(KeyError) as e:
        cfg.merge_from_list(["MODEL.MASK_FORMER.NUM_OBJECT_QUERY", "3"])
    msg = str(e.value)
    assert "'MODEL.MASK_FORMER.NUM_OBJECT_QUERY'" in msg and "merge_from_list" in msg
    assert "did you mean 'MODEL.MASK_FORMER.NUM_OBJECT_QUERIES'?" in msg
    with pytest.raises(ConfigKeyError, match="'MODEL.MASKFORMER.DEC_LAYERS'"):
        cfg.merge_from_list(["MODEL.MASKFORMER.DEC_LAYERS", "3"])
    with pytest.raises(ConfigTypeError, match="SOLVER.MAX_ITER"):
        cfg.merge_from_list(["SOLVER.MAX_ITER", "1.5"])
    with pytest.raises(ValueError, match="pairs"):
        cfg.merge_from_list(["SOLVER.MAX_ITER"])


def test_frozen_config_rejects_merge():
    cfg = get_cfg()
    cfg.freeze()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.merge_from_list(["SEED", "1"])


def test_get_cfg_is_fresh_and_complete():
    a, b = get_cfg(), get_cfg()
    a.MODEL.SWIN.DEPTHS.append(99)
    a.SOLVER.MAX_ITER = 1
    assert b.MODEL.SWIN.DEPTHS == [2, 2, 6, 2] and b.SOLVER.MAX_ITER == 40000
    assert isinstance(b, CfgNode) and isinstance(b.MODEL, CfgNode)
    # Detectron2 defaults, then the DeepLab and Mask2Former add-ons.
    assert b.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and b.FLOAT32_PRECISION == ""
    assert b.MODEL.RESNETS.STEM_TYPE == "deeplab" and b.SOLVER.POLY_LR_POWER == 0.9
    assert b.MODEL.MASK_FORMER.DEC_LAYERS == 6 and b.MODEL.SWIN.QK_SCALE is None
    assert b.MODEL.MASK_FORMER.TRAIN_NUM_POINTS == 112 * 112
    assert b.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 1.0 and b.GLOBAL.HACK == 1.0


def test_add_configs_to_bare_fvcore_node():
    cfg = FvCfgNode()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    assert type(cfg.MODEL.MASK_FORMER) is FvCfgNode  # sections use the caller's class
    assert cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON is True
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "BasePixelDecoder"
    assert cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS == [6, 12, 18]
    assert cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 1.0
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.POLY_LR_CONSTANT_ENDING == 0.0
    # Same keys and values as in get_cfg().
    full = _flat(get_cfg())
    assert all(full[k] == v for k, v in _flat(cfg).items())


def test_add_config_keeps_unrelated_keys():
    cfg = FvCfgNode({"MODEL": {"DEVICE": "cpu", "SEM_SEG_HEAD": {"NUM_CLASSES": 3}}})
    add_maskformer2_config(cfg)
    assert cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    assert cfg.MODEL.SEM_SEG_HEAD.MASK_DIM == 256


def test_dump_roundtrip(tmp_path):
    cfg = _load("configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml")
    f = _write(tmp_path / "dumped.yaml", cfg.dump())
    again = get_cfg()
    again.merge_from_file(str(f))
    assert _flat(again) == _flat(cfg)


def test_configurable_is_exported():
    class Thing:
        @configurable
        def __init__(self, n):
            self.n = n

        @classmethod
        def from_config(cls, cfg):
            return {"n": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES}

    assert Thing(get_cfg()).n == 100 and Thing(n=3).n == 3
