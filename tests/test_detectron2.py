"""The optional Detectron2 integration (mask2former/detectron2).

Every test that needs Detectron2 is skipped, with the reason, when it is not installed (it is
not on PyPI and is never a dependency of this project). Three tests run without it: a broken
Detectron2 cannot break ``import mask2former``; without an importable Detectron2, or with
``M2F_DETECTRON2=0``, nothing of Detectron2 is imported; and ``--engine detectron2`` without
Detectron2 exits with install instructions.

With Detectron2:
* ``detectron2.modeling.build_model`` builds this package's model from the parity configs
  (Detectron2's own ResNet as backbone), ``DetectionCheckpointer`` loads the tiny model-zoo
  checkpoints, and the outputs equal this package's engine's (max abs diff <= 1e-5, masks,
  classes and panoptic segments identical) and the official outputs (tolerances of
  tests/test_parity.py); they are Detectron2 structures that its Visualizer draws;
* the mappers feed Detectron2's loaders with Detectron2 structures;
* ``train_net.py --engine detectron2`` trains with Detectron2's DefaultTrainer and evaluates with
  its evaluators; their PQ / AP / mIoU equal this package's evaluators' on the same checkpoint
  (``train_net.py --eval-only``) within 1e-6 (the metrics are in percent).
"""
import json
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mask2former as m2f
from tests.conftest import require_shared

REPO = Path(__file__).resolve().parents[1]
PARITY_MODELS = ["panoptic", "instance", "semantic", "swin_semantic", "maskformer_semantic", "semask_semantic"]
SWIN_BACKBONES = {"swin_semantic": "D2SwinTransformer", "semask_semantic": "D2SeMaskSwinTransformer"}
SKIP_REASON = ("Detectron2 is not installed: the optional Detectron2 integration is not tested "
               "(pip install 'git+https://github.com/facebookresearch/detectron2.git' to run these tests)")
OUTPUT_TOL = 1e-5  # Detectron2-built model vs this package's engine
METRIC_TOL = 1e-6  # Detectron2's evaluators vs this package's, in percent points


@pytest.fixture(scope="session")
def d2():
    return pytest.importorskip("detectron2", reason=SKIP_REASON)


def _d2_cfg(path=None):
    """Detectron2's config (+ DeepLab and Mask2Former keys, + kMaX-DeepLab's for a kMaX config:
    mask2former.detectron2.trainer.get_cfg) with ``path`` merged by Detectron2, on the CPU."""
    from mask2former.detectron2.trainer import get_cfg

    arch = ""
    if path is not None:
        ours = m2f.get_cfg()
        ours.merge_from_file(str(path))
        arch = ours.MODEL.META_ARCHITECTURE
    cfg = get_cfg(arch)
    if path is not None:
        cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _run(model, image_hwc, out_hw):
    inp = {"image": torch.as_tensor(image_hwc.transpose(2, 0, 1)).float(),
           "height": int(out_hw[0]), "width": int(out_hw[1])}
    with torch.no_grad():
        return model([inp])[0]


# ----------------------------------------------------------------------------- without Detectron2
@pytest.mark.slow
def test_broken_detectron2_does_not_break_import(tmp_path):
    """A Detectron2 that fails to import costs one warning, never ``import mask2former``."""
    fake = tmp_path / "detectron2"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('this detectron2 is broken on purpose')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    env.pop("M2F_DETECTRON2", None)
    code = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mask2former
        msgs = [str(x.message) for x in w if "Detectron2" in str(x.message)]
        assert len(msgs) == 1 and "broken on purpose" in msgs[0] and "M2F_DETECTRON2=0" in msgs[0], msgs
        assert mask2former.get_cfg() is not None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


_FRESH_IMPORT = textwrap.dedent("""
    import importlib, importlib.abc, os, sys, warnings

    fake_dir, marker, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    lookups = []

    class Finder(importlib.abc.MetaPathFinder):
        # records every lookup of detectron2 (or a submodule); while `block`, none is found
        block = True

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "detectron2":
                lookups.append(name)
                if self.block:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    def d2_modules():
        return sorted(m for m in sys.modules if m.split(".")[0] == "detectron2")

    def d2_warnings(caught):
        return [str(w.message) for w in caught if "Detectron2" in str(w.message)]

    finder = Finder()
    sys.meta_path.insert(0, finder)
    # 1. Detectron2 not importable: `import mask2former` looks it up once and imports nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mask2former
    assert lookups == ["detectron2"] and d2_modules() == [], (lookups, d2_modules())
    assert not [m for m in sys.modules if m.startswith("mask2former.detectron2.")]
    assert d2_warnings(caught) == []
    # (M2F_DATASETS_YAML, read by the same import: every file of the list is registered)
    from mask2former.data import DatasetCatalog, MetadataCatalog
    assert all(n in DatasetCatalog for n in names), names
    assert [MetadataCatalog.get(n).stuff_classes for n in names] == [["a", "b"], ["c"]]

    # 2. M2F_DETECTRON2=0 with an importable Detectron2 (fake_dir's, whose import writes `marker`):
    #    the integration (what `import mask2former` runs last) does not even look for it
    finder.block = False
    lookups.clear()
    sys.path.insert(0, fake_dir)
    importlib.invalidate_caches()
    import mask2former.detectron2 as integration
    os.environ["M2F_DETECTRON2"] = "0"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert integration.maybe_register() is False
    assert lookups == [] and d2_modules() == [] and not os.path.exists(marker) and d2_warnings(caught) == []
    # the control: without the variable the same call imports the fake (which fails on purpose)
    del os.environ["M2F_DETECTRON2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert integration.maybe_register() is False
    assert os.path.exists(marker) and len(d2_warnings(caught)) == 1, d2_warnings(caught)
    print("ok")
""")


@pytest.mark.slow
def test_fresh_import_without_detectron2_or_with_m2f_detectron2_0(tmp_path):
    """README: "without it nothing is imported and nothing changes"; "M2F_DETECTRON2=0 turns the
    integration off". One fresh interpreter: ``import mask2former`` with Detectron2 hidden (even
    when installed) leaves no ``detectron2`` module and imports none of the integration's
    submodules; then, with an importable fake Detectron2 and ``M2F_DETECTRON2=0``, the integration
    does not look it up (and without the variable it does). The same import registers the two
    YAML files listed in ``M2F_DATASETS_YAML`` (README, Custom datasets)."""
    fake = tmp_path / "fake" / "detectron2"
    fake.mkdir(parents=True)
    marker = tmp_path / "detectron2_imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "raise ImportError('fake detectron2, imported on purpose')\n")
    tag = uuid.uuid4().hex[:8]
    names = [f"env_a_{tag}", f"env_b_{tag}"]
    files = []
    for name, classes in zip(names, ("[a, b]", "[c]")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"datasets:\n  - {{name: {name}, type: sem_seg, image_root: img, gt_root: gt, "
                        f"classes: {classes}}}\n")
        files.append(str(path))
    env = dict(os.environ, PYTHONPATH=str(REPO), M2F_DATASETS_YAML=os.pathsep.join(files))
    env.pop("M2F_DETECTRON2", None)
    out = subprocess.run([sys.executable, "-c", _FRESH_IMPORT, str(tmp_path / "fake"), str(marker), ",".join(names)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_engine_detectron2_without_detectron2_explains(monkeypatch, capsys):
    import importlib.util

    import mask2former.detectron2 as integration

    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    monkeypatch.setattr(integration, "is_available", lambda: False)
    args = train_net.default_argument_parser().parse_args(
        ["--engine", "detectron2", "--config-file", "configs/synthetic/panoptic.yaml"])
    with pytest.raises(SystemExit) as e:
        train_net.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "detectron2" in err and "--engine ours" in err


# ----------------------------------------------------------------------------- config and registries
def test_official_configs_merge_into_detectron2_cfg(d2, parity_dir):
    files = sorted((REPO / "configs").rglob("*.yaml")) + sorted(parity_dir.glob("tiny_*.yaml"))
    assert len(files) > 10
    for f in files:
        cfg = _d2_cfg(f)  # raises on any unknown key
        assert cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD is not None
    # the keys are those of the official add_deeplab_config + add_maskformer2_config
    cfg, ours = _d2_cfg(), m2f.get_cfg()
    assert cfg.MODEL.MASK_FORMER == ours.MODEL.MASK_FORMER and cfg.MODEL.SWIN == ours.MODEL.SWIN
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "BasePixelDecoder"
    assert cfg.SOLVER.POLY_LR_POWER == 0.9 and cfg.INPUT.DATASET_MAPPER_NAME == ours.INPUT.DATASET_MAPPER_NAME


def test_components_registered_under_official_names(d2):
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    from mask2former.detectron2 import registration
    from mask2former.modeling.heads import BranchMaskFormerHead, MaskFormerHead

    assert META_ARCH_REGISTRY.get("MaskFormer") is registration.MaskFormer
    assert SEM_SEG_HEADS_REGISTRY.get("MaskFormerHead") is MaskFormerHead
    assert BACKBONE_REGISTRY.get("D2SwinTransformer") is registration.D2SwinTransformer
    # SeMask's
    assert META_ARCH_REGISTRY.get("SeMaskMaskFormer") is registration.SeMaskMaskFormer
    assert SEM_SEG_HEADS_REGISTRY.get("BranchMaskFormerHead") is BranchMaskFormerHead
    assert BACKBONE_REGISTRY.get("D2SeMaskSwinTransformer") is registration.D2SeMaskSwinTransformer
    # Detectron2's own ResNet is not replaced
    assert BACKBONE_REGISTRY.get("build_resnet_backbone").__module__.startswith("detectron2.")
    for name in ("BasePixelDecoder", "MSDeformAttnPixelDecoder"):
        assert name in registration.PIXEL_DECODER_REGISTRY
    for name in ("MultiScaleMaskedTransformerDecoder", "StandardTransformerDecoder"):
        assert name in registration.TRANSFORMER_DECODER_REGISTRY
    registration.register_all()  # idempotent
    # datasets Detectron2 lacks are mirrored into its catalogs, with their metadata
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert "synthetic_panoptic_val" in DatasetCatalog.list()
    meta = MetadataCatalog.get("synthetic_panoptic_val")
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.thing_classes == ["circle", "square", "triangle"]


def test_registration_failure_is_one_warning(d2, monkeypatch):
    import mask2former.detectron2 as integration
    from mask2former.detectron2 import registration

    def boom():
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(registration, "register_all", boom)
    with pytest.warns(RuntimeWarning, match="simulated failure"):
        assert integration.maybe_register() is False
    monkeypatch.setenv("M2F_DETECTRON2", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert integration.maybe_register() is False


@pytest.mark.parametrize("manifest", ["coco_panoptic_R50", "coco_instance_R50", "ade20k_semantic_R50",
                                      "ade20k_semantic_swinT", "cityscapes_instance_R101",
                                      "mapillary_panoptic_R50"])
def test_detectron2_built_full_model_has_official_keys(d2, parity_dir, manifest):
    from detectron2.modeling import build_model

    m = json.loads(require_shared(parity_dir / f"manifest_{manifest}.json").read_text())
    model = build_model(_d2_cfg(REPO / m["config"]))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == set(m["keys"])
    assert all(shapes[k] == list(m["keys"][k]) for k in shapes)


# ----------------------------------------------------------------------------- parity
def _build_both(parity_dir, name):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tests.test_parity import parity_file

    cfg = _d2_cfg(parity_file(parity_dir, name, ".yaml"))
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(parity_file(parity_dir, name, ".pkl")))

    ours_cfg = m2f.get_cfg()
    ours_cfg.merge_from_file(str(parity_file(parity_dir, name, ".yaml")))
    ours_cfg.MODEL.DEVICE = "cpu"
    ours = m2f.build_model(ours_cfg, load_weights=False).eval()
    res = m2f.load_checkpoint(ours, str(parity_file(parity_dir, name, ".pkl")))
    assert not res.missing_keys and not res.unexpected_keys
    return cfg, model, ours


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_detectron2_build_model_matches_ours_and_official(d2, parity_dir, name):
    from detectron2.modeling import Backbone
    from detectron2.structures import Boxes, Instances

    from tests.test_parity import (PIXEL_AGREEMENT, PROB_TOL, canonical_panoptic, parity_cases, parity_file,
                                   same_partition)

    _, model, ours = _build_both(parity_dir, name)
    assert isinstance(model.backbone, Backbone)
    if name in SWIN_BACKBONES:
        assert type(model.backbone).__name__ == SWIN_BACKBONES[name]
    else:
        assert type(model.backbone).__module__.startswith("detectron2.")  # Detectron2's ResNet
    # DetectionCheckpointer loaded every tensor: the weights equal those load_checkpoint loads
    sd, ref = model.state_dict(), ours.state_dict()
    assert sd.keys() == ref.keys()
    for k in sd:
        assert torch.equal(sd[k], ref[k]), k

    io = np.load(parity_file(parity_dir, name, "_io.npz"))
    checked = set()
    for case in parity_cases(io):
        g = lambda key: io[f"{case}__{key}"]  # noqa: E731
        keys = {k.split("__")[1] for k in io.files if k.startswith(case + "__")}
        out = _run(model, g("image"), g("out_hw"))
        mine = _run(ours, g("image"), g("out_hw"))
        assert set(out) == set(mine)
        if "sem_seg" in out:
            sem = out["sem_seg"]
            assert float((sem - mine["sem_seg"]).abs().max()) <= OUTPUT_TOL
        if "sem_mean" in keys:
            np.testing.assert_allclose(sem.mean((1, 2)).numpy(), g("sem_mean"), atol=PROB_TOL, rtol=0)
            yx = g("sem_yx")
            np.testing.assert_allclose(sem[:, yx[0], yx[1]].numpy(), g("sem_samples"), atol=PROB_TOL, rtol=0)
            assert (sem.argmax(0).numpy() == g("sem_argmax")).mean() >= PIXEL_AGREEMENT
            checked.add("semantic")
        if "panoptic_seg" in out:
            seg, info = out["panoptic_seg"]
            assert isinstance(seg, torch.Tensor) and seg.dtype == torch.int32
            assert torch.equal(seg, mine["panoptic_seg"][0]) and info == mine["panoptic_seg"][1]
        if "panoptic_seg" in keys:
            ref_seg, ref_info = g("panoptic_seg"), json.loads(str(g("panoptic_info")))
            cats, segs = canonical_panoptic(seg.numpy(), info)
            ref_cats, ref_segs = canonical_panoptic(ref_seg, ref_info)
            assert segs == ref_segs and (cats == ref_cats).mean() >= PIXEL_AGREEMENT
            assert same_partition(seg.numpy(), ref_seg)
            checked.add("panoptic")
        if "instances" in out:
            ins, mins = out["instances"], mine["instances"]
            assert isinstance(ins, Instances) and isinstance(ins.pred_boxes, Boxes)
            assert isinstance(ins.pred_masks, torch.Tensor)
            assert ins.pred_classes.tolist() == mins.pred_classes.tolist()
            assert len(ins) == len(mins)
            if len(ins):
                assert float((ins.scores - mins.scores).abs().max()) <= OUTPUT_TOL
            assert torch.equal(ins.pred_masks, mins.pred_masks)
            assert torch.equal(ins.pred_boxes.tensor, mins.pred_boxes.tensor)
        if "ins_scores" in keys:
            assert ins.pred_classes.tolist() == g("ins_classes").tolist()
            np.testing.assert_allclose(ins.scores.numpy(), g("ins_scores"), atol=PROB_TOL, rtol=0)
            masks = ins.pred_masks.numpy().astype(np.uint8)
            assert masks.shape == g("ins_masks").shape
            # each instance on its own: the masks are mostly foreground, so agreement pooled over
            # all N instances would hide one wrong mask
            for k, (mask, ref) in enumerate(zip(masks, g("ins_masks"))):
                assert (mask == ref).mean() >= PIXEL_AGREEMENT, (case, k)
            checked.add("instance")
    assert checked


def test_checkpoints_of_our_engine_load_in_detectron2(d2, parity_dir, tmp_path):
    """A .pth as this package's trainer writes it (model, optimizer, scheduler, iteration, RNG
    states) loads with Detectron2's DetectionCheckpointer, and one saved by Detectron2 loads with
    ``load_checkpoint`` (the --engine detectron2 test trains and evaluates across engines too)."""
    from detectron2.checkpoint import DetectionCheckpointer

    from mask2former.checkpoint import save_checkpoint
    from mask2former.utils.rng import get_rng_states

    _, model, ours = _build_both(parity_dir, "semantic")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01)
    ours_file = tmp_path / "model_ours.pth"
    save_checkpoint({"model": ours.state_dict(), "iteration": 3, "rng_states": [get_rng_states()],
                     "world_size": 1}, ours_file)
    DetectionCheckpointer(model).load(str(ours_file))
    for k, v in ours.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_d2")
    fresh = m2f.build_model(_d2_cfg(parity_dir / "tiny_semantic.yaml").clone(), load_weights=False)
    res = m2f.load_checkpoint(fresh, str(tmp_path / "model_d2.pth"))
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_detectron2_visualizer_draws_outputs(d2, parity_dir):
    from detectron2.data import MetadataCatalog
    from detectron2.utils.visualizer import ColorMode, Visualizer

    cfg, model, _ = _build_both(parity_dir, "panoptic")
    io = np.load(parity_dir / "tiny_panoptic_io.npz")
    case = sorted(k for k in io.files if k.endswith("_native__image"))[0].split("__")[0]
    image = io[f"{case}__image"]
    out = _run(model, image, image.shape[:2])
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    seg, info = out["panoptic_seg"]
    drawn = Visualizer(image, meta).draw_panoptic_seg_predictions(seg, info).get_image()
    assert drawn.shape == image.shape
    ins = out["instances"]
    ins = ins[ins.scores > 0.0]
    for mode in (ColorMode.IMAGE, ColorMode.IMAGE_BW):
        drawn = Visualizer(image, meta, instance_mode=mode).draw_instance_predictions(ins[:5]).get_image()
        assert drawn.shape == image.shape
    drawn = Visualizer(image, meta).draw_sem_seg(out["sem_seg"].argmax(0)).get_image()
    assert drawn.shape == image.shape


# ----------------------------------------------------------------------------- evaluator selection
_D2_CLASS_KIND = {"SemSegEvaluator": "sem_seg", "COCOPanopticEvaluator": "coco_panoptic",
                  "COCOEvaluator": "coco_instances", "InstanceSegEvaluator": "instance_seg",
                  "CityscapesSemSegEvaluator": "cityscapes_sem_seg",
                  "CityscapesInstanceEvaluator": "cityscapes_instance", "LVISEvaluator": "lvis"}


def test_build_evaluator_maps_the_shared_choice_to_detectron2_classes(d2, monkeypatch, tmp_path):
    """The adapter builds, in order, the Detectron2 class of each kind that
    mask2former.evaluation.selection chooses (the official choice; see
    tests/test_evaluator_selection.py), for every evaluator_type and TEST switch setting."""
    import itertools

    from detectron2.data import MetadataCatalog

    from mask2former.detectron2 import trainer
    from mask2former.evaluation.selection import EVALUATOR_RULES, evaluator_kinds

    for cls_name, kind in _D2_CLASS_KIND.items():  # stand-ins that need no dataset files
        assert hasattr(trainer, cls_name)
        monkeypatch.setattr(trainer, cls_name, lambda *args, _kind=kind, **kwargs: _kind)
    monkeypatch.setattr(trainer, "DatasetEvaluators", list)
    cfg = trainer.get_cfg()
    test = cfg.MODEL.MASK_FORMER.TEST
    for evaluator_type in EVALUATOR_RULES:
        name = f"_m2f_test_selection_{evaluator_type}"
        MetadataCatalog.get(name).set(evaluator_type=evaluator_type)
        for flags in itertools.product((False, True), repeat=3):
            test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON = flags
            expected = evaluator_kinds(evaluator_type, panoptic_on=flags[0], instance_on=flags[1],
                                       semantic_on=flags[2])
            if not expected:
                with pytest.raises(NotImplementedError, match="No evaluator"):
                    trainer.build_evaluator(cfg, name, str(tmp_path))
                continue
            got = trainer.build_evaluator(cfg, name, str(tmp_path))
            assert (got if isinstance(got, list) else [got]) == expected, (evaluator_type, flags)


# ----------------------------------------------------------------------------- data and training
@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small copy of the synthetic dataset (32 train, 8 val images) under $DETECTRON2_DATASETS."""
    from mask2former.data.datasets.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("d2_datasets")
    ensure_synthetic_dataset(str(root), splits={"train": 32, "val": 8})
    return root


def synthetic_names(synthetic_root):
    """The small synthetic copy registered as m2f_d2test_synthetic_{train,val} in this package's
    catalogs and Detectron2's; returns {"train": name, "val": name}."""
    from mask2former.data import DatasetCatalog
    from mask2former.data.datasets import register_coco_panoptic
    from mask2former.data.datasets.synthetic import metadata, split_paths
    from mask2former.detectron2.registration import register_datasets

    names = {s: f"m2f_d2test_synthetic_{s}" for s in ("train", "val")}
    for split, name in names.items():
        if name not in DatasetCatalog:
            p = split_paths(str(synthetic_root / "synthetic"), split)
            register_coco_panoptic(name, metadata(), p["image_root"], p["panoptic_root"], p["panoptic_json"],
                                   sem_seg_root=p["sem_seg_root"], instances_json=p["instances_json"])
    register_datasets()
    return names


def test_mappers_feed_detectron2_loaders(d2, synthetic_root):
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances

    from mask2former.detectron2 import build_mapper

    names = synthetic_names(synthetic_root)
    cfg = _d2_cfg(REPO / "configs/synthetic/panoptic.yaml")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names["train"],), (names["val"],)
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS = 2, 0

    batch = next(iter(build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))))
    assert len(batch) == 2
    for sample in batch:
        inst = sample["instances"]
        assert isinstance(inst, Instances) and isinstance(inst.gt_masks, BitMasks)
        assert isinstance(inst.gt_boxes, Boxes) and inst.gt_classes.dtype == torch.int64
        assert tuple(inst.gt_masks.tensor.shape[-2:]) == tuple(sample["image"].shape[-2:])
    model = build_model(cfg).train()
    losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values())

    test_batch = next(iter(build_detection_test_loader(cfg, names["val"], mapper=build_mapper(cfg, False))))
    assert test_batch[0]["image"].shape[0] == 3 and "instances" not in test_batch[0]
    with torch.no_grad():
        out = model.eval()(test_batch)[0]
    assert isinstance(out["instances"], Instances) and "panoptic_seg" in out and "sem_seg" in out


def _train_net(args, env, log):
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py")] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.mark.slow
def test_train_net_engine_detectron2_matches_our_evaluators(d2, synthetic_root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_root), PYTHONWARNINGS="ignore")
    env.pop("M2F_DETECTRON2", None)
    # same settings for both runs: a short but useful training (no warmup, a higher LR) and an
    # object-mask threshold of 0 so that panoptic and instance outputs are not empty
    common = ["DATALOADER.NUM_WORKERS", "0", "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0"]
    d2_out, ours_out = tmp_path / "d2", tmp_path / "ours"
    _train_net(["--engine", "detectron2", "--config-file", "configs/synthetic/panoptic.yaml",
                "SOLVER.MAX_ITER", "20", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.003",
                "SOLVER.WARMUP_ITERS", "0", "OUTPUT_DIR", str(d2_out)] + common, env, tmp_path / "d2.log")
    assert (d2_out / "model_final.pth").is_file()
    log = (d2_out / "log.txt").read_text()
    for logger_name in ("d2.engine.train_loop", "d2.evaluation.panoptic_evaluation",
                        "d2.evaluation.coco_evaluation", "d2.evaluation.sem_seg_evaluation"):
        assert logger_name in log, f"{logger_name} did not log: not Detectron2's trainer/evaluators?"
    _train_net(["--eval-only", "--config-file", "configs/synthetic/panoptic.yaml",
                "MODEL.WEIGHTS", str(d2_out / "model_final.pth"), "OUTPUT_DIR", str(ours_out)] + common,
               env, tmp_path / "ours.log")

    theirs = json.loads((d2_out / "eval_results.json").read_text())
    mine = json.loads((ours_out / "eval_results.json").read_text())
    headline = {"panoptic_seg": ["PQ", "SQ", "RQ", "PQ_th", "PQ_st"], "segm": ["AP", "AP50", "AP75"],
                "sem_seg": ["mIoU", "fwIoU", "mACC", "pACC"]}
    compared = 0
    for task, metrics in headline.items():
        for k in metrics:
            assert k in theirs[task] and k in mine[task], (task, k)
    for task in headline:
        for k in set(theirs[task]) & set(mine[task]):
            a, b = float(theirs[task][k]), float(mine[task][k])
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= METRIC_TOL, (task, k, a, b)
            compared += 1
    assert compared >= 20
    # the training did something: stuff classes are segmented
    assert theirs["sem_seg"]["mIoU"] > 5 and theirs["panoptic_seg"]["PQ"] > 1


def test_engine_detectron2_refuses_hostile_config(d2, tmp_path):
    """--engine detectron2 reads config files with this package's loader: Detectron2's own
    merge_from_file would run the tag (fvcore falls back to yaml.unsafe_load)."""
    sentinel = tmp_path / "pwned"
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(f'MODEL:\n  META_ARCHITECTURE: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--engine", "detectron2", "--config-file",
                           str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and not sentinel.exists()
    assert "MODEL.META_ARCHITECTURE" in proc.stderr and "!!python/object/apply:os.system" in proc.stderr
