"""kMaX-DeepLab's config keys: the official defaults, INPUT.IMAGE_SIZE in both its forms, the
official dump and the configs at the official paths."""
import pytest
import yaml

from mask2former.config import (CfgNode, ConfigTypeError, add_deeplab_config, add_kmax_deeplab_config, get_cfg,
                                image_size_hw)
from mask2former.config.defaults import DETECTRON2_DEFAULTS

from tests.conftest import REPO, require_shared
from tests.test_config import _flat, _get, _write


def test_get_cfg_has_the_kmax_keys_and_keeps_mask2formers_shared_defaults():
    cfg = get_cfg()
    assert cfg.MODEL.KMAX_DEEPLAB.TRANS_DEC.NUM_OBJECT_QUERIES == 128
    assert cfg.MODEL.KMAX_DEEPLAB.TEST.PIXEL_CONFIDENCE_THRESHOLD == 0.4
    assert cfg.MODEL.CONVNEXT.LSIT == 1e-6
    # keys both projects define keep Mask2Former's defaults in the shared schema
    assert (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.SOLVER.WEIGHT_DECAY_EMBED) == (1024, 0.1, 0.0)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic"


def test_add_kmax_deeplab_config_sets_the_official_values():
    """As the official training script: Detectron2's and DeepLab's keys, then kMaX's function."""
    cfg = CfgNode(DETECTRON2_DEFAULTS)
    add_deeplab_config(cfg)
    add_kmax_deeplab_config(cfg)
    assert cfg.INPUT.IMAGE_SIZE == [1281, 1281]
    assert (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == (0.2, 2.0)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_panoptic_kmaxdeeplab"
    assert (cfg.SOLVER.WEIGHT_DECAY_EMBED, cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BACKBONE_MULTIPLIER) == (0.05, "ADAMW", 0.1)
    assert cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC.LAYER_TYPES == ["axial", "axial", "bottleneck", "bottleneck"]
    assert cfg.MODEL.KMAX_DEEPLAB.NO_OBJECT_WEIGHT == 1e-5


@pytest.mark.parametrize("text, value, hw", [("1024", 1024, (1024, 1024)), ("[97, 129]", [97, 129], (97, 129)),
                                              ("(65, 65)", [65, 65], (65, 65))])
def test_image_size_takes_an_int_or_a_pair(tmp_path, text, value, hw):
    path = _write(tmp_path / "c.yaml", f"INPUT:\n  IMAGE_SIZE: {text}\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    assert cfg.INPUT.IMAGE_SIZE == value and image_size_hw(cfg.INPUT.IMAGE_SIZE) == hw
    other = get_cfg()
    other.merge_from_list(["INPUT.IMAGE_SIZE", text])
    assert other.INPUT.IMAGE_SIZE == value
    # and both forms keep their meaning in the LSJ training augmentation: an h x w crop
    from mask2former.data.dataset_mappers.official import build_augmentations

    cfg.INPUT.RANDOM_FLIP = "none"
    resize, crop = build_augmentations(cfg, is_train=True, style="lsj")
    assert (resize.target_height, resize.target_width) == hw and tuple(crop.crop_size) == hw


@pytest.mark.parametrize("text", ["[97]", "[97, 97, 97]", "[0, 97]", "-1", "97.0", "'big'", "[97, 97.5]", "True"])
def test_bad_image_size_names_the_key_and_both_forms(tmp_path, text):
    path = _write(tmp_path / "c.yaml", f"INPUT:\n  IMAGE_SIZE: {text}\n")
    with pytest.raises(ConfigTypeError, match=r"INPUT\.IMAGE_SIZE.*positive int.*\[height, width\]"):
        get_cfg().merge_from_file(str(path))


def test_official_kmax_dump_loads_with_every_value(parity_dir):
    """The tiny model's full dump (Detectron2 + DeepLab + kMaX keys) has no key we lack, and every
    value survives merging."""
    path = require_shared(parity_dir / "kmax" / "tiny_kmax_panoptic.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    dumped, ours = _flat(yaml.safe_load(path.read_text())), _flat(cfg)
    assert {k: ours[k] for k in dumped} == dumped


KMAX_CONFIGS = {  # official path -> values that identify it
    "configs/coco/panoptic_segmentation/kmax_r50.yaml": {
        "MODEL.BACKBONE.NAME": "custom_bn_build_resnet_backbone", "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 133,
        "INPUT.IMAGE_SIZE": [1281, 1281], "MODEL.KMAX_DEEPLAB.TRANS_DEC.DROP_PATH_PROB": 0.2,
        "SOLVER.WEIGHT_DECAY_EMBED": 0.05, "MODEL.RESNETS.NORM": "SyncBN"},
    "configs/coco/panoptic_segmentation/kmax_convnext_tiny.yaml": {
        "MODEL.BACKBONE.NAME": "D2ConvNeXt", "MODEL.CONVNEXT.DEPTHS": [3, 3, 9, 3],
        "MODEL.CONVNEXT.DIMS": [96, 192, 384, 768], "MODEL.CONVNEXT.DROP_PATH_RATE": 0.3},
    "configs/coco/panoptic_segmentation/kmax_convnext_small.yaml": {
        "MODEL.CONVNEXT.DEPTHS": [3, 3, 27, 3], "MODEL.CONVNEXT.DIMS": [96, 192, 384, 768],
        "MODEL.CONVNEXT.DROP_PATH_RATE": 0.4},
    "configs/coco/panoptic_segmentation/kmax_convnext_base.yaml": {
        "MODEL.CONVNEXT.DIMS": [128, 256, 512, 1024], "MODEL.CONVNEXT.DROP_PATH_RATE": 0.5},
    "configs/coco/panoptic_segmentation/kmax_convnext_large.yaml": {
        "MODEL.CONVNEXT.DIMS": [192, 384, 768, 1536], "MODEL.CONVNEXT.DROP_PATH_RATE": 0.6,
        "MODEL.WEIGHTS": "../convnext_large_22k_1k_384.pkl"},
    "configs/ade20k/panoptic_segmentation/kmax_r50.yaml": {
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 150, "MODEL.KMAX_DEEPLAB.TEST.CLASS_THRESHOLD_THING": 0.4,
        "INPUT.MIN_SCALE": 0.5, "SOLVER.MAX_ITER": 100000, "INPUT.DATASET_MAPPER_NAME": "ade20k_panoptic_lsj"},
    "configs/ade20k/panoptic_segmentation/kmax_convnext_large.yaml": {
        "MODEL.BACKBONE.NAME": "D2ConvNeXt", "MODEL.CONVNEXT.DROP_PATH_RATE": 0.7,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 150},
    "configs/cityscapes/panoptic_segmentation/kmax_r50.yaml": {
        "INPUT.IMAGE_SIZE": [1025, 2049], "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19,
        "MODEL.RESNETS.OUT_FEATURES": ["stem", "res2", "res3", "res4", "res5"],
        "MODEL.KMAX_DEEPLAB.PIXEL_DEC.DEC_CHANNELS": [512, 256, 128, 64, 32],
        "MODEL.KMAX_DEEPLAB.USE_AUX_SEMANTIC_DECODER": False,
        "MODEL.KMAX_DEEPLAB.TRANS_DEC.NUM_OBJECT_QUERIES": 256,
        "MODEL.KMAX_DEEPLAB.TEST.REORDER_MASK_WEIGHT": 0.0},
    "configs/cityscapes/panoptic_segmentation/kmax_convnext_large.yaml": {
        "MODEL.CONVNEXT.OUT_FEATURES": ["stem", "res2", "res3", "res4", "res5"], "INPUT.MAX_SIZE_TEST": 2049},
}


def test_every_official_kmax_config_is_listed():
    present = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("kmax_*.yaml"))
    assert present == sorted(KMAX_CONFIGS)


@pytest.mark.parametrize("path", sorted(KMAX_CONFIGS))
def test_kmax_config_values(path):
    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / path))
    got = {k: _get(cfg, k) for k in KMAX_CONFIGS[path]}
    got = {k: list(v) if isinstance(v, tuple) else v for k, v in got.items()}
    assert got == KMAX_CONFIGS[path]
    assert cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab" and cfg.MODEL.PIXEL_MEAN == [127.5] * 3


def test_kmax_r50_config_agrees_with_the_official_dump(parity_dir):
    """Every key the tiny parity model did not change equals our config's value at its path."""
    path = require_shared(parity_dir / "kmax" / "tiny_kmax_panoptic.yaml")
    official, ours = get_cfg(), get_cfg()
    official.merge_from_file(str(path))
    ours.merge_from_file(str(REPO / "configs/coco/panoptic_segmentation/kmax_r50.yaml"))
    a, b = _flat(official), _flat(ours)
    tiny = {"MODEL.DEVICE", "MODEL.WEIGHTS", "MODEL.RESNETS.WIDTH_PER_GROUP", "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "MODEL.RESNETS.STEM_OUT_CHANNELS", "INPUT.IMAGE_SIZE", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST",
            "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT"} | {
        f"MODEL.KMAX_DEEPLAB.{k}" for k in ("PIXEL_DEC.DEC_LAYERS", "PIXEL_DEC.DEC_CHANNELS", "TRANS_DEC.IN_CHANNELS",
                                            "TRANS_DEC.DEC_LAYERS", "TRANS_DEC.NUM_OBJECT_QUERIES",
                                            "TEST.SEMANTIC_ON", "TEST.INSTANCE_ON")}
    differing = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in tiny}
    assert differing == {}
