"""Evaluation: the evaluator interface, the inference loop, and the PQ / AP / mIoU evaluators.

    evaluator = build_evaluators(cfg, "coco_2017_val_panoptic", output_dir)
    results = inference_on_dataset(model, data_loader, evaluator)
    # {"panoptic_seg": {"PQ": ..., "SQ": ..., ...}, "segm": {"AP": ...}, "sem_seg": {"mIoU": ...}}

Modules: ``evaluator`` (interface, :func:`inference_on_dataset`), ``selection`` (which evaluator
kinds a dataset gets, shared with the Detectron2 adapter), ``pq`` (the PQ metric) and
``panoptic_evaluation`` (its COCO panoptic evaluator), ``instance_evaluation`` (COCO mask AP),
``sem_seg_evaluation`` (mIoU), ``cityscapes_evaluation`` (the Cityscapes scripts), ``files``
(atomic JSON / PNG writing, also used by the demo's exporters).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from ..data.catalog import MetadataCatalog
from .cityscapes_evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_context, inference_on_dataset
from .instance_evaluation import COCOEvaluator, InstanceSegEvaluator, instances_to_coco_json
from .panoptic_evaluation import COCOPanopticEvaluator
from .pq import PQStat, pq_compute_single
from .selection import EVALUATOR_KINDS, evaluator_kinds, select_evaluator_kinds
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
    "evaluator_kinds",
    "EVALUATOR_KINDS",
]

logger = logging.getLogger(__name__)

# This package's evaluator class for each kind of mask2former.evaluation.selection (none for LVIS),
# and whether it takes output_dir (the Cityscapes ones keep their files in a temporary folder, as
# in the official script). One InstanceSegEvaluator maps contiguous ids back to dataset ids for
# COCO, ADE20K and Mapillary alike.
_EVALUATORS: Dict[str, Tuple[type, bool]] = {
    "sem_seg": (SemSegEvaluator, True),
    "coco_panoptic": (COCOPanopticEvaluator, True),
    "coco_instances": (InstanceSegEvaluator, True),
    "instance_seg": (InstanceSegEvaluator, True),
    "cityscapes_sem_seg": (CityscapesSemSegEvaluator, False),
    "cityscapes_instance": (CityscapesInstanceEvaluator, False),
}
_OPTIONAL_KINDS = ("cityscapes_sem_seg", "cityscapes_instance")  # need cityscapesscripts


def build_evaluators(cfg: Any, dataset_name: str, output_dir: Optional[str] = None) -> DatasetEvaluator:
    """The evaluator(s) for ``dataset_name``, chosen as the official ``train_net.py`` does.

    The choice (:func:`~mask2former.evaluation.selection.evaluator_kinds`) depends on the
    metadata's ``evaluator_type`` and on ``MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``:

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
    supported (``--engine detectron2`` has it). The official script's box AP for ``coco``
    datasets is not computed (Mask2Former predicts no boxes of its own); use
    ``InstanceSegEvaluator(tasks=("segm", "bbox"))`` for boxes derived from the masks.

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
    kinds = select_evaluator_kinds(cfg, dataset_name, evaluator_type)
    unsupported = [k for k in kinds if k not in _EVALUATORS]
    if unsupported:
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type={evaluator_type!r}: this package "
            f"has no {', '.join(unsupported)} evaluator (train_net.py --engine detectron2 has)"
        )
    evaluators: List[DatasetEvaluator] = []
    for kind in kinds:
        cls, takes_output_dir = _EVALUATORS[kind]
        try:
            evaluators.append(cls(dataset_name, output_dir=output_dir) if takes_output_dir else cls(dataset_name))
        except ImportError as e:
            # a missing cityscapesscripts only skips an evaluator when an earlier one runs
            if kind not in _OPTIONAL_KINDS or not evaluators:
                raise
            logger.warning("%s is skipped for %r: %s", cls.__name__, dataset_name, e)
    if len(evaluators) == 1:
        return evaluators[0]
    return DatasetEvaluators(evaluators)
