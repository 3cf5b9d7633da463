"""kMaX-DeepLab's training setup: the TF-style warmup-poly schedule, the optimizer's no-decay
rules, the mapper names and augmentations, and the SyncBN -> BN replacement for kMaX's 1-D norms."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import mask2former as m2f
from mask2former.data import transforms as T
from mask2former.data.dataset_mappers import PanoptickMaXDeepLabDatasetMapper, build_augmentations, build_mapper
from mask2former.evaluation.selection import select_evaluator_kinds
from mask2former.solver import TF2WarmupPolyLR, build_lr_scheduler, get_optimizer_param_groups
from tests.conftest import REPO
from tests.test_kmax_layers import build_meta, tiny_cfg

SYNTHETIC = REPO / "configs" / "synthetic" / "panoptic_kmax.yaml"


def official_tf2_poly(it, max_iter, warmup_factor, warmup_iters, power, constant_ending):
    """kMaX's TF2WarmupPolyLR multiplier, written out (linear warmup)."""
    if it < warmup_iters:
        alpha = it / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    poly = (1 - it / max_iter) ** power
    return constant_ending if constant_ending > 0 and poly < constant_ending else poly


@pytest.mark.parametrize("constant_ending", [0.0, 0.3])
def test_tf2_warmup_poly_schedule(constant_ending):
    cfg = tiny_cfg("SOLVER.MAX_ITER", "100", "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.001",
                   "SOLVER.POLY_LR_CONSTANT_ENDING", str(constant_ending))
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "TF2WarmupPolyLR"
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = build_lr_scheduler(cfg, opt)
    for it in range(100):
        want = 0.5 * official_tf2_poly(it, 100, 0.001, 10, 0.9, constant_ending)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), it
        opt.step()
        sched.step()
    # unlike WarmupPolyLR, the warmup factor does not multiply the poly term
    assert TF2WarmupPolyLR(opt, 100, warmup_iters=10).multiplier_at(9) == pytest.approx(0.001 * 0.1 + 0.9)
    assert math.isclose(TF2WarmupPolyLR(opt, 100, warmup_iters=10).multiplier_at(10), 0.9 ** 0.9)


def test_kmax_no_decay_rules():
    model = build_meta(tiny_cfg())
    cfg = tiny_cfg()
    kwargs = dict(base_lr=1.0, weight_decay=0.05, backbone_multiplier=0.1, weight_decay_norm=0.0,
                  weight_decay_embed=0.05)
    decay = {id(p): g["weight_decay"] for g in get_optimizer_param_groups(model, kmax_rules=True, **kwargs)
             for p in g["params"]}
    lr = {id(p): g["lr"] for g in get_optimizer_param_groups(model, kmax_rules=True, **kwargs) for p in g["params"]}
    names = dict(model.named_parameters())
    head = "sem_seg_head.predictor."
    assert decay[id(names[head + "_cluster_centers.weight"])] == 0.0
    rpe = [n for n in names if "_rpe" in n]
    biases = [n for n in names if "bias" in n.rsplit(".", 1)[-1]]
    assert rpe and biases and all(decay[id(names[n])] == 0.0 for n in rpe + biases)
    conv = head + "_class_embedding_projection.conv.weight"
    assert decay[id(names[conv])] == 0.05 and lr[id(names[conv])] == 1.0
    assert lr[id(names["backbone.stem.conv1.weight"])] == pytest.approx(0.1)
    # without the kMaX rules (Mask2Former): embeddings and biases decay
    plain = {id(p): g["weight_decay"] for g in get_optimizer_param_groups(model, **kwargs) for p in g["params"]}
    assert plain[id(names[head + "_cluster_centers.weight"])] == 0.05
    assert any(plain[id(names[n])] == 0.05 for n in biases)
    assert cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab"


def test_kmax_mapper_names_and_augmentations():
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(SYNTHETIC))
    mapper = build_mapper(cfg, True)
    assert type(mapper) is PanoptickMaXDeepLabDatasetMapper and mapper.task == "panoptic"
    kinds = [type(a) for a in mapper.augmentations]
    assert kinds == [T.ResizeScale, T.ColorAugSSD, T.RandomCrop, T.RandomFlip]
    assert mapper.augmentations[2].crop_size == (129, 129) and mapper.augmentations[2].crop_type == "absolute"
    # the official kMaX configs' names mean kMaX's mapper for a kMaX model, Mask2Former's otherwise
    for name in ("coco_panoptic_lsj", "ade20k_panoptic_lsj", "cityscapes_panoptic_lsj"):
        cfg.INPUT.DATASET_MAPPER_NAME = name
        assert type(build_mapper(cfg, True)) is PanoptickMaXDeepLabDatasetMapper
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.INPUT.DATASET_MAPPER_NAME = "coco_panoptic_lsj"
    assert type(build_mapper(cfg, True)) is not PanoptickMaXDeepLabDatasetMapper
    assert [type(a) for a in build_augmentations(cfg, False, "kmax")] == [T.ResizeShortestEdge]


def test_kmax_augmentations_never_exceed_the_image_size():
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(SYNTHETIC))
    cfg.merge_from_list(["INPUT.IMAGE_SIZE", "[65, 97]", "INPUT.MIN_SCALE", "0.2", "INPUT.MAX_SCALE", "2.0"])
    augs = build_augmentations(cfg, True, "kmax")
    rng = np.random.default_rng(0)
    sizes = set()
    for i in range(20):
        image = rng.integers(0, 255, (60 + 7 * i, 90, 3), dtype=np.uint8)
        aug_input = T.AugInput(image)
        T.apply_augmentations(augs, aug_input, rng)
        h, w = aug_input.image.shape[:2]
        assert h <= 65 and w <= 97
        sizes.add((h, w))
    assert len(sizes) > 1  # smaller scales stay smaller: the model pads them


def test_evaluators_follow_the_kmax_test_switches():
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(SYNTHETIC))
    cfg.merge_from_list(["MODEL.KMAX_DEEPLAB.TEST.INSTANCE_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True"])
    assert select_evaluator_kinds(cfg, "x", "coco_panoptic_seg") == ["coco_panoptic", "sem_seg"]
    cfg.merge_from_list(["MODEL.KMAX_DEEPLAB.TEST.PANOPTIC_ON", "False", "MODEL.KMAX_DEEPLAB.TEST.SEMANTIC_ON",
                         "False"])
    with pytest.raises(NotImplementedError, match=r"MODEL\.KMAX_DEEPLAB\.TEST: PANOPTIC_ON=False"):
        select_evaluator_kinds(cfg, "x", "coco_panoptic_seg")


def test_syncbn_stand_in_takes_kmax_ranks():
    """On CPU process groups the trainer swaps SyncBatchNorm for a per-process BN: it must take the
    3-D and 5-D inputs kMaX gives its TF-style batch norms, as BatchNorm1d / 3d would."""
    from mask2former.engine.trainer import _sync_bn_to_bn
    from mask2former.layers.norm import tf_batch_norm

    model = nn.ModuleDict({"a": tf_batch_norm(4), "b": tf_batch_norm(1)})
    weight = model["a"].weight
    model = _sync_bn_to_bn(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert isinstance(model["a"], nn.BatchNorm2d) and model["a"].weight is weight
    for key, ref, x in (("a", nn.BatchNorm1d(4, eps=1e-3, momentum=0.01), torch.randn(3, 4, 7)),
                        ("b", nn.BatchNorm3d(1, eps=1e-3, momentum=0.01), torch.randn(2, 1, 3, 5, 5))):
        torch.testing.assert_close(model[key](x), ref(x))
        torch.testing.assert_close(model[key].running_var, ref.running_var)
