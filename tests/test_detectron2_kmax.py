"""kMaX-DeepLab through the Detectron2 integration (skipped without Detectron2, like
tests/test_detectron2.py, whose helpers it uses):

* its parts are in Detectron2's registries under the official extension's names;
* Detectron2's ``build_model`` builds the released kMaX models (R50 with the custom-BN ResNet,
  ConvNeXt-L) from our configs at their official paths with exactly the manifests' keys and shapes;
* the Detectron2-built tiny model, its checkpoint loaded by ``DetectionCheckpointer``, gives this
  package's outputs and the official ones (tolerances of tests/test_kmax_model.py) as Detectron2
  structures;
* it trains from samples in Detectron2's structures: those this package's kMaX mapper gives
  through Detectron2's loader, and those of the official kMaX mapper (image zero-padded to
  INPUT.IMAGE_SIZE with ``is_real_pixels``, ``gt_masks`` a tensor, ``sem_seg_gt``), with the losses
  of this package's model on the same samples;
* a kMaX config gives Detectron2's engine (``--engine detectron2``) the values this package's
  engine reads, and ``train_net.py --engine detectron2`` trains the synthetic kMaX config, with
  Detectron2's evaluators giving this package's PQ / AP / mIoU on the checkpoint.
"""
import json
import os

import numpy as np
import pytest
import torch

import mask2former as m2f
from tests.test_config import _flat
from tests.test_detectron2 import (METRIC_TOL, REPO, _d2_cfg, _run, _train_net, d2,  # noqa: F401 (fixtures)
                                   synthetic_names, synthetic_root)
from tests.test_kmax_model import MANIFESTS, compare, io, kmax_dir  # noqa: F401 (fixtures)

OUTPUT_TOL = 1e-5  # the Detectron2-built model vs this package's engine
KMAX_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*kmax*.yaml"))
SYNTHETIC = REPO / "configs" / "synthetic" / "panoptic_kmax.yaml"


def test_kmax_registered_under_official_names(d2):
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    from mask2former.detectron2 import registration
    from mask2former.modeling.pixel_decoder import kMaXPixelDecoder

    assert META_ARCH_REGISTRY.get("kMaXDeepLab") is registration.kMaXDeepLab
    assert SEM_SEG_HEADS_REGISTRY.get("kMaXDeepLabHead") is registration.kMaXDeepLabHead
    assert SEM_SEG_HEADS_REGISTRY.get("kMaXPixelDecoder") is kMaXPixelDecoder  # where the official code has it
    assert BACKBONE_REGISTRY.get("custom_bn_build_resnet_backbone") is registration.custom_bn_build_resnet_backbone
    assert BACKBONE_REGISTRY.get("D2ConvNeXt") is registration.D2ConvNeXt
    assert "kMaXTransformerDecoder" in registration.TRANSFORMER_DECODER_REGISTRY
    assert BACKBONE_REGISTRY.get("build_resnet_backbone").__module__.startswith("detectron2.")


def test_head_takes_its_pixel_decoder_from_detectron2s_registry(d2, kmax_dir):
    """As the official head: a pixel decoder registered in Detectron2's SEM_SEG_HEADS is built."""
    from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, build_model

    from mask2former.modeling.pixel_decoder import kMaXPixelDecoder

    class MyPixelDecoder(kMaXPixelDecoder):
        pass

    SEM_SEG_HEADS_REGISTRY.register(MyPixelDecoder)
    try:
        cfg = _d2_cfg(kmax_dir / "tiny_kmax_panoptic.yaml")
        cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME = "MyPixelDecoder"
        assert type(build_model(cfg).sem_seg_head.pixel_decoder) is MyPixelDecoder
        cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME = "NoSuchDecoder"
        with pytest.raises(KeyError, match="MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME = 'NoSuchDecoder'"):
            build_model(cfg)
    finally:
        SEM_SEG_HEADS_REGISTRY._obj_map.pop("MyPixelDecoder")


@pytest.mark.parametrize("name", MANIFESTS)
def test_detectron2_built_kmax_models_have_the_released_keys(d2, kmax_dir, name):
    from detectron2.modeling import Backbone, build_model

    from mask2former.detectron2 import registration

    spec = json.loads((kmax_dir / f"manifest_kmax_{name}.json").read_text())
    cfg = _d2_cfg(REPO / spec["config"])
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, registration.kMaXDeepLab) and isinstance(model.backbone, Backbone)
    assert type(model.backbone).__name__ == {"coco_panoptic_R50": "_D2ResNet", "coco_panoptic_convnextL": "D2ConvNeXt"}[name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: list(v) for k, v in spec["keys"].items()}


def _build_both(kmax_dir):
    """The tiny kMaX model built by Detectron2 (weights by DetectionCheckpointer) and by this package."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    yaml, pkl = kmax_dir / "tiny_kmax_panoptic.yaml", kmax_dir / "tiny_kmax_panoptic.pkl"
    cfg = _d2_cfg(yaml)
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(pkl))
    ours_cfg = m2f.get_cfg()
    ours_cfg.merge_from_file(str(yaml))
    ours = m2f.build_model(ours_cfg, load_weights=False).eval()
    res = m2f.load_checkpoint(ours, str(pkl))
    assert not res.missing_keys and not res.unexpected_keys
    return cfg, model, ours


@pytest.fixture(scope="module")
def both(d2, kmax_dir):
    return _build_both(kmax_dir)


@pytest.mark.slow
def test_detectron2_built_tiny_kmax_matches_ours_and_official(both, io):
    from detectron2.structures import Boxes, Instances

    _, model, ours = both
    sd, ref = model.state_dict(), ours.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    cases = sorted({k.split("__")[0] for k in io.files})
    assert len(cases) == 6
    for case in cases:
        g = lambda key: io[f"{case}__{key}"]  # noqa: E731
        out, mine = _run(model, g("image"), g("out_hw")), _run(ours, g("image"), g("out_hw"))
        assert set(out) == set(mine) == {"sem_seg", "panoptic_seg", "instances", "original_image"}
        ins = out["instances"]
        assert isinstance(ins, Instances) and isinstance(ins.pred_boxes, Boxes)
        assert float((out["sem_seg"] - mine["sem_seg"]).abs().max()) <= OUTPUT_TOL
        assert torch.equal(out["panoptic_seg"][0], mine["panoptic_seg"][0])
        assert out["panoptic_seg"][1] == mine["panoptic_seg"][1]
        assert ins.pred_classes.tolist() == mine["instances"].pred_classes.tolist()
        assert torch.equal(ins.pred_masks, mine["instances"].pred_masks)
        assert torch.equal(out["original_image"], mine["original_image"])
        compare(out, g)  # the official outputs


def _samples(h_w=((97, 80), (60, 97)), num_classes=133):
    """Two training samples as this package's kMaX mapper gives them: images within IMAGE_SIZE
    (97 x 97), instances (gt_classes, gt_masks bool at the image's size) of thing and stuff classes."""
    from mask2former.structures import Instances

    samples = []
    for seed, (h, w) in enumerate(h_w):
        g = torch.Generator().manual_seed(seed)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        ids = torch.zeros(h, w, dtype=torch.int64)
        ids[: h // 2] = 1  # stuff above, two things below
        ids[h // 2:, : w // 3] = 2
        ids[h // 2 + 5: h - 4, w // 2: w - 6] = 3
        masks = torch.stack([ids == k for k in (1, 2, 3)])
        classes = torch.tensor([100 + seed, 3, 17 + seed])  # 80..132: stuff
        samples.append({"image": image, "instances": Instances((h, w), gt_classes=classes, gt_masks=masks)})
    return samples


def _as_official_mapper_gives(sample, size=(97, 97), num_classes=133):
    """The official kMaX mapper's form of ``sample``: the image zero-padded to IMAGE_SIZE with
    "is_real_pixels", Detectron2 Instances with ``gt_masks`` a tensor at that size and ``gt_boxes``,
    the semantic labels "sem_seg_gt" (void = num_classes) and "valid_pixel_num"."""
    from detectron2.structures import BitMasks, Instances

    h, w = sample["image"].shape[-2:]
    image = torch.zeros((3, *size), dtype=torch.uint8)
    image[:, :h, :w] = sample["image"]
    real = torch.zeros(size, dtype=torch.bool)
    real[:h, :w] = True
    inst = sample["instances"]
    masks = torch.zeros((len(inst.gt_classes), *size), dtype=torch.bool)
    masks[:, :h, :w] = inst.gt_masks
    semantic = torch.full(size, num_classes, dtype=torch.int64)
    for m, c in zip(masks, inst.gt_classes):
        semantic[m] = c
    out = Instances(size, gt_classes=inst.gt_classes.clone(), gt_masks=masks,
                    gt_boxes=BitMasks(masks).get_bounding_boxes())
    return {"image": image, "is_real_pixels": real, "instances": out, "sem_seg_gt": semantic,
            "valid_pixel_num": int((semantic != num_classes).sum())}


def _losses(model, batch):
    model.train()
    model.criterion.reseed(0)  # the pixel sampling from its start (the tiny config's SEED is -1: drawn)
    torch.manual_seed(0)  # drop path
    try:
        return model(batch)
    finally:
        model.eval()


@pytest.mark.slow
def test_detectron2_built_kmax_trains_like_ours_from_detectron2_samples(both):
    from mask2former.detectron2.convert import to_detectron2_instances

    _, model, ours_model = both
    samples = _samples()
    converted = [dict(s, instances=to_detectron2_instances(s["instances"], bitmask_fields=("gt_masks",)))
                 for s in samples]
    official = [_as_official_mapper_gives(s) for s in samples]
    ours = _losses(ours_model, samples)
    from_bitmasks, from_official = _losses(model, converted), _losses(model, official)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_pixel_insdis"} <= set(ours)
    assert all(torch.isfinite(v) for v in ours.values())
    for other in (from_bitmasks, from_official):
        assert other.keys() == ours.keys()
        assert [k for k in ours if not torch.equal(ours[k], other[k])] == []


@pytest.mark.slow
def test_kmax_mapper_feeds_detectron2_loader_and_a_training_step(d2, synthetic_root):
    """The synthetic kMaX config through Detectron2: this package's kMaX mapper in Detectron2's
    train loader, the model of Detectron2's build_model, one optimizer step."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Instances

    from mask2former.detectron2 import build_mapper

    names = synthetic_names(synthetic_root)
    cfg = _d2_cfg(SYNTHETIC)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names["train"],), (names["val"],)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 0
    cfg.INPUT.IMAGE_SIZE = [65, 65]
    cfg.MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K = cfg.MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K = 128
    batch = next(iter(build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))))
    for sample in batch:
        inst = sample["instances"]
        assert isinstance(inst, Instances) and isinstance(inst.gt_masks, BitMasks)
        assert all(s <= 65 for s in sample["image"].shape[-2:])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = model(batch)
    assert "loss_aux_semantic" in losses and all(torch.isfinite(v) for v in losses.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sum(losses.values()).backward()
    optimizer.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("sem_seg_head.") for k in changed)


@pytest.mark.parametrize("path", KMAX_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_kmax_config_means_the_same_to_both_engines(d2, path):
    from mask2former.detectron2.trainer import load_config

    theirs = _flat(load_config(path))
    ours = m2f.get_cfg()
    ours.merge_from_file(str(path))
    ours = _flat(ours)
    assert theirs["INPUT.IMAGE_SIZE"] == ours["INPUT.IMAGE_SIZE"] and len(theirs["INPUT.IMAGE_SIZE"]) == 2
    assert {k: (theirs[k], ours[k]) for k in set(theirs) & set(ours) if theirs[k] != ours[k]} == {}


@pytest.mark.slow
def test_train_net_engine_detectron2_trains_kmax(d2, synthetic_root, tmp_path):
    """train_net.py --engine detectron2 with the synthetic kMaX config (two iterations): Detectron2's
    trainer and evaluators; this package's --eval-only on its checkpoint gives the same metrics."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_root), PYTHONWARNINGS="ignore")
    env.pop("M2F_DETECTRON2", None)
    common = ["DATALOADER.NUM_WORKERS", "0", "INPUT.IMAGE_SIZE", "[65, 65]", "INPUT.MIN_SIZE_TEST", "65",
              "INPUT.MAX_SIZE_TEST", "65"]
    d2_out, ours_out = tmp_path / "d2", tmp_path / "ours"
    _train_net(["--engine", "detectron2", "--config-file", str(SYNTHETIC), "SOLVER.MAX_ITER", "2",
                "SOLVER.IMS_PER_BATCH", "2", "MODEL.KMAX_DEEPLAB.PIXEL_INSDIS_SAMPLE_K", "128",
                "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_SAMPLE_K", "128", "OUTPUT_DIR", str(d2_out)] + common,
               env, tmp_path / "d2.log")
    log = (d2_out / "log.txt").read_text()
    assert "d2.engine.train_loop" in log and "d2.evaluation.panoptic_evaluation" in log
    _train_net(["--eval-only", "--config-file", str(SYNTHETIC), "MODEL.WEIGHTS", str(d2_out / "model_final.pth"),
                "OUTPUT_DIR", str(ours_out)] + common, env, tmp_path / "ours.log")
    theirs = json.loads((d2_out / "eval_results.json").read_text())
    mine = json.loads((ours_out / "eval_results.json").read_text())
    # Detectron2's COCOEvaluator also scores the boxes (of the masks), as with the official scripts
    assert set(theirs) == set(mine) | {"bbox"} and set(mine) == {"panoptic_seg", "segm", "sem_seg"}
    for task in mine:
        assert set(theirs[task]) >= {"PQ", "AP", "mIoU"} & set(mine[task])
        for k in set(theirs[task]) & set(mine[task]):
            a, b = float(theirs[task][k]), float(mine[task][k])
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= METRIC_TOL, (task, k, a, b)


def test_detectron2_trainer_gives_copy_paste_its_training_list(d2, synthetic_root):
    """With copy-paste on, the Detectron2 trainer's loader hands the kMaX mapper the list it
    samples from, and its samples carry the pasted canvas' ``is_real_pixels``."""
    from mask2former.detectron2.trainer import Trainer as D2Trainer

    names = synthetic_names(synthetic_root)
    cfg = _d2_cfg(REPO / "configs" / "synthetic" / "panoptic_kmax_copy_paste.yaml")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names["train"],), (names["val"],)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 0
    cfg.INPUT.IMAGE_SIZE = [65, 65]
    assert cfg.MODEL.KMAX_DEEPLAB.COPY_PASTE
    batch = next(iter(D2Trainer.build_train_loader(cfg)))
    assert len(batch) == 2
    for sample in batch:
        real = sample["is_real_pixels"]
        assert real.shape == sample["image"].shape[-2:] and real.any()
        assert len(sample["instances"]) > 0
