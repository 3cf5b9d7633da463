"""Evaluation: the evaluator interface, the inference loop, and the PQ / AP / mIoU evaluators.

    evaluator = build_evaluators(cfg, "coco_2017_val_panoptic", output_dir)
    results = inference_on_dataset(model, data_loader, evaluator)
    # {"panoptic_seg": {"PQ": ..., "SQ": ..., ...}, "segm": {"AP": ...}, "sem_seg": {"mIoU": ...}}
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

from ..data.catalog import MetadataCatalog
from .cityscapes_evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_context, inference_on_dataset
from .instance_evaluation import COCOEvaluator, InstanceSegEvaluator, instances_to_coco_json
from .panoptic_evaluation import COCOPanopticEvaluator, PQStat, pq_compute_single
from .sem_seg_evaluation import SemSegEvaluator

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_on_dataset",
    "inference_context",
    "COCOPanopticEvaluator",
    "PQStat",
    "pq_compute_single",
    "InstanceSegEvaluator",
    "COCOEvaluator",
    "instances_to_coco_json",
    "SemSegEvaluator",
    "CityscapesSemSegEvaluator",
    "CityscapesInstanceEvaluator",
    "build_evaluators",
]

logger = logging.getLogger(__name__)

_PANOPTIC_TYPES = (
    "coco_panoptic_seg",
    "ade20k_panoptic_seg",
    "cityscapes_panoptic_seg",
    "mapillary_vistas_panoptic_seg",
)


def _test_flag(cfg: Any, name: str, default: bool) -> bool:
    try:
        return bool(getattr(cfg.MODEL.MASK_FORMER.TEST, name))
    except AttributeError:
        return default


def build_evaluators(cfg: Any, dataset_name: str, output_dir: Optional[str] = None) -> DatasetEvaluator:
    """The evaluator(s) for ``dataset_name``, chosen as the official ``train_net.py`` does.

    The choice depends on the metadata's ``evaluator_type`` and on
    ``MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``:

    ==============================  ===========================================================
    evaluator_type                  evaluators
    ==============================  ===========================================================
    ``sem_seg``                     SemSegEvaluator
    ``coco``                        InstanceSegEvaluator (segm AP)
    ``coco_panoptic_seg``           COCOPanopticEvaluator if PANOPTIC_ON, InstanceSegEvaluator
                                    if INSTANCE_ON, SemSegEvaluator if SEMANTIC_ON
    ``ade20k_panoptic_seg``         SemSegEvaluator (always), COCOPanopticEvaluator if
                                    PANOPTIC_ON, InstanceSegEvaluator if INSTANCE_ON
    ``mapillary_vistas_panoptic_seg``  COCOPanopticEvaluator if PANOPTIC_ON,
                                    InstanceSegEvaluator if INSTANCE_ON, SemSegEvaluator if
                                    SEMANTIC_ON
    ``cityscapes_sem_seg``          CityscapesSemSegEvaluator (only)
    ``cityscapes_instance``         CityscapesInstanceEvaluator (only)
    ``cityscapes_panoptic_seg``     COCOPanopticEvaluator if PANOPTIC_ON,
                                    CityscapesSemSegEvaluator if SEMANTIC_ON,
                                    CityscapesInstanceEvaluator if INSTANCE_ON
    ==============================  ===========================================================

    The Cityscapes evaluators need the optional package ``cityscapesscripts``
    (``pip install "mask2former[cityscapes]"``). Without it, ``cityscapes_sem_seg`` and
    ``cityscapes_instance`` raise ImportError; for ``cityscapes_panoptic_seg`` the semantic /
    instance evaluators are skipped with a warning when PQ is evaluated, and the ImportError is
    raised when nothing else would be. As in the official script, the Cityscapes evaluators
    keep their predictions in a temporary folder, not under ``output_dir``. LVIS is not
    supported. The official script's box AP for ``coco`` datasets is not computed (Mask2Former
    predicts no boxes of its own); use ``InstanceSegEvaluator(tasks=("segm", "bbox"))`` for
    boxes derived from the masks.

    Args:
        cfg: the config.
        dataset_name: a name known to :data:`MetadataCatalog` with ``evaluator_type``.
        output_dir: where evaluators write predictions; default ``<cfg.OUTPUT_DIR>/inference``.

    Returns:
        one evaluator, or :class:`DatasetEvaluators` combining several.

    Raises:
        NotImplementedError: when no evaluator applies.
        ImportError: when the Cityscapes evaluators that apply need ``cityscapesscripts`` and it
            is not installed.
    """
    if output_dir is None:
        output_dir = os.path.join(getattr(cfg, "OUTPUT_DIR", "./output"), "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    panoptic_on = _test_flag(cfg, "PANOPTIC_ON", False)
    instance_on = _test_flag(cfg, "INSTANCE_ON", False)
    semantic_on = _test_flag(cfg, "SEMANTIC_ON", True)

    if evaluator_type == "cityscapes_sem_seg":
        return CityscapesSemSegEvaluator(dataset_name)
    if evaluator_type == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)

    evaluators: List[DatasetEvaluator] = []
    if evaluator_type in ("sem_seg", "ade20k_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type == "coco":
        evaluators.append(InstanceSegEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type in _PANOPTIC_TYPES and panoptic_on:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_dir))
    if evaluator_type in ("coco_panoptic_seg", "mapillary_vistas_panoptic_seg", "ade20k_panoptic_seg"):
        if instance_on:
            evaluators.append(InstanceSegEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type in ("coco_panoptic_seg", "mapillary_vistas_panoptic_seg") and semantic_on:
        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))
    if evaluator_type == "cityscapes_panoptic_seg":
        wanted = [cls for cls, on in ((CityscapesSemSegEvaluator, semantic_on),
                                      (CityscapesInstanceEvaluator, instance_on)) if on]
        for cls in wanted:
            try:
                evaluators.append(cls(dataset_name))
            except ImportError as e:
                if not evaluators:
                    raise
                logger.warning("%s is skipped for %r: %s", cls.__name__, dataset_name, e)

    if not evaluators:
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type={evaluator_type!r} "
            f"(MODEL.MASK_FORMER.TEST: PANOPTIC_ON={panoptic_on}, INSTANCE_ON={instance_on}, "
            f"SEMANTIC_ON={semantic_on})"
        )
    if len(evaluators) == 1:
        return evaluators[0]
    return DatasetEvaluators(evaluators)
