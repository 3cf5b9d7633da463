"""Which evaluators a dataset gets: one decision for this package's and Detectron2's evaluators.

:func:`evaluator_kinds` is the official ``train_net.py`` ``build_evaluator`` choice, written as a
table: from the metadata's ``evaluator_type`` and ``MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,
SEMANTIC}_ON`` it returns evaluator *kinds* in the official order. Each entry point maps the kinds
to its own classes: :func:`mask2former.evaluation.build_evaluators` to this package's,
:func:`mask2former.detectron2.trainer.build_evaluator` to Detectron2's.

======================  ====================================================================
kind                    what it measures
======================  ====================================================================
``sem_seg``             mIoU of ``sem_seg`` (SemSegEvaluator)
``coco_panoptic``       PQ of ``panoptic_seg`` (COCOPanopticEvaluator)
``coco_instances``      mask AP of ``instances`` where thing ids are the COCO ones (COCOEvaluator)
``instance_seg``        mask AP of ``instances`` of panoptic datasets whose thing ids are not
                        contiguous (ADE20K, Mapillary Vistas: the official InstanceSegEvaluator)
``cityscapes_sem_seg``  Cityscapes pixel-level scripts
``cityscapes_instance`` Cityscapes instance-level scripts
``lvis``                LVIS AP
======================  ====================================================================
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..config.defaults import KMAX_DEEPLAB_DEFAULTS, MASKFORMER2_DEFAULTS

__all__ = ["EVALUATOR_KINDS", "EVALUATOR_RULES", "evaluator_kinds", "task_switches", "switch_task_on",
           "select_evaluator_kinds"]

EVALUATOR_KINDS = ("sem_seg", "coco_panoptic", "coco_instances", "instance_seg", "cityscapes_sem_seg",
                   "cityscapes_instance", "lvis")

_SWITCHES = ("PANOPTIC_ON", "INSTANCE_ON", "SEMANTIC_ON")

#: evaluator_type -> ((kind, switch), ...) in the official order; switch None: always.
EVALUATOR_RULES: Dict[str, Tuple[Tuple[str, Optional[str]], ...]] = {
    "sem_seg": (("sem_seg", None),),
    "coco": (("coco_instances", None),),
    "coco_panoptic_seg": (("coco_panoptic", "PANOPTIC_ON"), ("coco_instances", "INSTANCE_ON"),
                          ("sem_seg", "SEMANTIC_ON")),
    "ade20k_panoptic_seg": (("sem_seg", None), ("coco_panoptic", "PANOPTIC_ON"), ("instance_seg", "INSTANCE_ON")),
    "mapillary_vistas_panoptic_seg": (("coco_panoptic", "PANOPTIC_ON"), ("instance_seg", "INSTANCE_ON"),
                                      ("sem_seg", "SEMANTIC_ON")),
    "cityscapes_panoptic_seg": (("coco_panoptic", "PANOPTIC_ON"), ("cityscapes_sem_seg", "SEMANTIC_ON"),
                                ("cityscapes_instance", "INSTANCE_ON")),
    "cityscapes_sem_seg": (("cityscapes_sem_seg", None),),
    "cityscapes_instance": (("cityscapes_instance", None),),
    "lvis": (("lvis", None),),
}


def evaluator_kinds(evaluator_type: Optional[str], *, panoptic_on: bool, instance_on: bool,
                    semantic_on: bool) -> List[str]:
    """The evaluator kinds of a dataset of ``evaluator_type`` under the three TEST switches
    (empty for an unknown type or when every switched kind is off)."""
    on = {"PANOPTIC_ON": bool(panoptic_on), "INSTANCE_ON": bool(instance_on), "SEMANTIC_ON": bool(semantic_on)}
    return [kind for kind, switch in EVALUATOR_RULES.get(evaluator_type, ()) if switch is None or on[switch]]


def _switch_section(cfg: Any) -> str:
    # kMaX-DeepLab's switches live under its own key, as its training script reads them
    model = getattr(cfg, "MODEL", None)
    return "KMAX_DEEPLAB" if getattr(model, "META_ARCHITECTURE", None) == "kMaXDeepLab" else "MASK_FORMER"


def task_switches(cfg: Any) -> Dict[str, bool]:
    """``{"PANOPTIC_ON", "INSTANCE_ON", "SEMANTIC_ON"}`` of ``cfg.MODEL.MASK_FORMER.TEST`` (of
    ``cfg.MODEL.KMAX_DEEPLAB.TEST`` for a kMaXDeepLab model); a key a config lacks takes its
    default (config/defaults.py)."""
    section = _switch_section(cfg)
    defaults = (KMAX_DEEPLAB_DEFAULTS if section == "KMAX_DEEPLAB" else MASKFORMER2_DEFAULTS)["MODEL"][section]["TEST"]
    test = getattr(getattr(getattr(cfg, "MODEL", None), section, None), "TEST", None)
    return {key: bool(getattr(test, key, defaults[key])) for key in _SWITCHES}


def switch_task_on(cfg: Any, switch: str) -> Optional[str]:
    """Turn ``switch`` ("PANOPTIC_ON", "INSTANCE_ON" or "SEMANTIC_ON") on in the TEST section that
    the model reads (see :func:`task_switches`) of the mutable ``cfg``. Returns the full key when it
    was off (e.g. ``"MODEL.KMAX_DEEPLAB.TEST.SEMANTIC_ON"``), None when it was on already."""
    if switch not in _SWITCHES:
        raise ValueError(f"unknown task switch {switch!r}; expected one of {_SWITCHES}")
    if task_switches(cfg)[switch]:
        return None
    section = _switch_section(cfg)
    setattr(getattr(cfg.MODEL, section).TEST, switch, True)
    return f"MODEL.{section}.TEST.{switch}"


def select_evaluator_kinds(cfg: Any, dataset_name: str, evaluator_type: Optional[str]) -> List[str]:
    """:func:`evaluator_kinds` for ``cfg``; NotImplementedError naming the dataset, its type and
    the switches when no evaluator applies."""
    switches = task_switches(cfg)
    kinds = evaluator_kinds(evaluator_type, panoptic_on=switches["PANOPTIC_ON"],
                            instance_on=switches["INSTANCE_ON"], semantic_on=switches["SEMANTIC_ON"])
    if not kinds:
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type={evaluator_type!r} "
            f"(MODEL.{_switch_section(cfg)}.TEST: PANOPTIC_ON={switches['PANOPTIC_ON']}, "
            f"INSTANCE_ON={switches['INSTANCE_ON']}, SEMANTIC_ON={switches['SEMANTIC_ON']})"
        )
    return kinds
