"""Which evaluators a dataset gets (mask2former.evaluation.selection), for every evaluator_type and
every setting of MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON, against the official
``train_net.py`` ``build_evaluator``; and this package's mapping of the kinds to its evaluators.
(The Detectron2 adapter's mapping is tested in tests/test_detectron2.py, with Detectron2.)
"""
import itertools
import json
import uuid

import pytest

from mask2former import get_cfg
from mask2former.data.catalog import MetadataCatalog
from mask2former.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluators,
    InstanceSegEvaluator,
    SemSegEvaluator,
    build_evaluators,
)
from mask2former.evaluation.selection import (
    EVALUATOR_KINDS,
    EVALUATOR_RULES,
    evaluator_kinds,
    select_evaluator_kinds,
    task_switches,
)

PANOPTIC_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg",
                  "mapillary_vistas_panoptic_seg")
ALL_TYPES = ("sem_seg", "coco", "lvis", "cityscapes_sem_seg", "cityscapes_instance") + PANOPTIC_TYPES
FLAGS = list(itertools.product((False, True), repeat=3))  # (PANOPTIC_ON, INSTANCE_ON, SEMANTIC_ON)


def _official(evaluator_type, panoptic_on, instance_on, semantic_on):
    """The evaluators the official train_net.py builds, step by step in its order, as kinds
    (COCOEvaluator: coco_instances, its InstanceSegEvaluator: instance_seg)."""
    t = evaluator_type
    kinds = []
    if t in ("sem_seg", "ade20k_panoptic_seg"):
        kinds.append("sem_seg")
    if t == "coco":
        kinds.append("coco_instances")
    if t in PANOPTIC_TYPES and panoptic_on:
        kinds.append("coco_panoptic")
    if t == "coco_panoptic_seg":
        kinds += ["coco_instances"] * instance_on + ["sem_seg"] * semantic_on
    if t == "mapillary_vistas_panoptic_seg":
        kinds += ["instance_seg"] * instance_on + ["sem_seg"] * semantic_on
    if t in ("cityscapes_instance", "cityscapes_sem_seg", "lvis"):
        return [t]  # returned alone
    if t == "cityscapes_panoptic_seg":
        kinds += ["cityscapes_sem_seg"] * semantic_on + ["cityscapes_instance"] * instance_on
    if t == "ade20k_panoptic_seg" and instance_on:
        kinds.append("instance_seg")
    return kinds


@pytest.mark.parametrize("evaluator_type", ALL_TYPES + ("unknown_type", None))
@pytest.mark.parametrize("flags", FLAGS)
def test_evaluator_kinds_equal_the_official_choice(evaluator_type, flags):
    got = evaluator_kinds(evaluator_type, panoptic_on=flags[0], instance_on=flags[1], semantic_on=flags[2])
    assert got == _official(evaluator_type, *flags)
    assert set(got) <= set(EVALUATOR_KINDS)


def test_evaluator_kinds_spot_checks():
    def kinds(t, p, i, s):
        return evaluator_kinds(t, panoptic_on=p, instance_on=i, semantic_on=s)
    assert set(EVALUATOR_RULES) == set(ALL_TYPES)
    # ADE20K always gets mIoU, whatever SEMANTIC_ON says
    assert kinds("ade20k_panoptic_seg", False, False, False) == ["sem_seg"]
    assert kinds("ade20k_panoptic_seg", True, True, True) == ["sem_seg", "coco_panoptic", "instance_seg"]
    # Mapillary: instance AP before mIoU (the adapter used to swap them)
    assert kinds("mapillary_vistas_panoptic_seg", True, True, True) == ["coco_panoptic", "instance_seg", "sem_seg"]
    assert kinds("coco_panoptic_seg", True, True, True) == ["coco_panoptic", "coco_instances", "sem_seg"]
    assert kinds("coco_panoptic_seg", False, False, False) == []
    assert kinds("cityscapes_panoptic_seg", True, True, True) == [
        "coco_panoptic", "cityscapes_sem_seg", "cityscapes_instance"]
    # the single-task types ignore the switches
    for t in ("sem_seg", "coco", "lvis", "cityscapes_sem_seg", "cityscapes_instance"):
        assert {tuple(kinds(t, *f)) for f in FLAGS} == {tuple(_official(t, True, True, True))}


def test_switches_and_no_evaluator_error():
    cfg = get_cfg()
    assert task_switches(cfg) == {"PANOPTIC_ON": False, "INSTANCE_ON": False, "SEMANTIC_ON": True}
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    assert task_switches(cfg)["PANOPTIC_ON"] is True
    assert task_switches(object()) == {"PANOPTIC_ON": False, "INSTANCE_ON": False, "SEMANTIC_ON": True}
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    with pytest.raises(NotImplementedError, match=r"No evaluator for dataset 'x'.*'coco_panoptic_seg'.*"
                                                  r"PANOPTIC_ON=False, INSTANCE_ON=False, SEMANTIC_ON=False"):
        select_evaluator_kinds(cfg, "x", "coco_panoptic_seg")
    with pytest.raises(NotImplementedError, match="evaluator_type=None"):
        select_evaluator_kinds(cfg, "x", None)


# --------------------------------------------------------------------------- this package's evaluators
_OUR_CLASS = {"sem_seg": SemSegEvaluator, "coco_panoptic": COCOPanopticEvaluator,
              "coco_instances": InstanceSegEvaluator, "instance_seg": InstanceSegEvaluator}


@pytest.fixture
def registered(tmp_path):
    """name -> evaluator_type of a fresh dataset per non-Cityscapes type, with the metadata the
    evaluators need to be built."""
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "height": 4, "width": 4, "file_name": "a.jpg"}],
                              "annotations": [], "categories": [{"id": 7, "name": "a"}]}))
    names = {}
    for t in ("sem_seg", "coco", "lvis", "coco_panoptic_seg", "ade20k_panoptic_seg", "mapillary_vistas_panoptic_seg"):
        name = f"_test_selection_{uuid.uuid4().hex[:8]}"
        MetadataCatalog.get(name).set(evaluator_type=t, stuff_classes=["a", "b"], ignore_label=255,
                                      json_file=str(gt), panoptic_json=str(tmp_path / "p.json"),
                                      panoptic_root=str(tmp_path), thing_dataset_id_to_contiguous_id={7: 0})
        names[name] = t
    yield names
    for name in names:
        MetadataCatalog.remove(name)


def test_build_evaluators_maps_every_kind_to_our_class(registered, tmp_path):
    cfg = get_cfg()
    test = cfg.MODEL.MASK_FORMER.TEST
    for name, evaluator_type in registered.items():
        for flags in FLAGS:
            test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON = flags
            kinds = _official(evaluator_type, *flags)
            if not kinds or evaluator_type == "lvis":
                with pytest.raises(NotImplementedError, match="No evaluator"):
                    build_evaluators(cfg, name, str(tmp_path / "out"))
                continue
            ev = build_evaluators(cfg, name, str(tmp_path / "out"))
            evaluators = ev.evaluators if isinstance(ev, DatasetEvaluators) else [ev]
            assert [type(e) for e in evaluators] == [_OUR_CLASS[k] for k in kinds], (evaluator_type, flags)
