"""The adapter boundary: this package's structures -> Detectron2's (needs Detectron2).

Model outputs keep the official extension's types: ``sem_seg`` (K, H, W) tensor,
``panoptic_seg`` (int32 (H, W) tensor, segments_info list) and ``instances`` as a Detectron2
``Instances`` with ``pred_masks`` a (N, H, W) tensor (what Detectron2's COCOEvaluator and
``Visualizer`` read; the Visualizer calls tensor methods on it), ``pred_boxes`` a Detectron2
``Boxes``, ``scores`` and ``pred_classes``.

Mapper outputs carry a Detectron2 ``Instances`` with ``gt_classes``, ``gt_masks`` as
``BitMasks`` and, when the mapper makes them, ``gt_boxes`` as ``Boxes``.
"""
import logging
from typing import Any, Dict, Iterable, List

import torch
from detectron2.structures import BitMasks as D2BitMasks
from detectron2.structures import Boxes as D2Boxes
from detectron2.structures import Instances as D2Instances

from .. import structures as ours
from ..data.dataset_mappers import BadSampleError
from ..data.dataset_mappers import build_mapper as _build_our_mapper

__all__ = ["to_detectron2_instances", "to_detectron2_outputs", "Detectron2Mapper", "build_mapper"]

logger = logging.getLogger(__name__)


def _convert_field(name: str, value: Any, bitmask_fields: Iterable[str]) -> Any:
    if isinstance(value, ours.Boxes):
        return D2Boxes(value.tensor)
    if name in bitmask_fields and isinstance(value, torch.Tensor):
        return D2BitMasks(value)
    return value


def to_detectron2_instances(instances: Any, bitmask_fields: Iterable[str] = ()) -> D2Instances:
    """This package's ``Instances`` (or an already-converted one) -> Detectron2's ``Instances``;
    ``Boxes`` become Detectron2 ``Boxes`` and the tensors named in ``bitmask_fields``
    Detectron2 ``BitMasks``; other fields are kept as they are."""
    if isinstance(instances, D2Instances):
        return instances
    bitmask_fields = tuple(bitmask_fields)
    out = D2Instances(tuple(instances.image_size))
    for name, value in instances.get_fields().items():
        out.set(name, _convert_field(name, value, bitmask_fields))
    return out


def to_detectron2_outputs(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Model outputs (one dict per image) with ``instances`` as Detectron2 ``Instances``."""
    converted = []
    for r in results:
        r = dict(r)
        if "instances" in r:
            r["instances"] = to_detectron2_instances(r["instances"])
        converted.append(r)
    return converted


class Detectron2Mapper:
    """Wraps one of this package's dataset mappers for Detectron2's data loaders: same samples,
    with ``instances`` as a Detectron2 ``Instances`` (``gt_masks`` as ``BitMasks``, ``gt_boxes``
    as ``Boxes``). During training a sample whose files are unreadable or inconsistent
    (:class:`~mask2former.data.dataset_mappers.BadSampleError`) is logged and skipped by returning
    None, which Detectron2's ``MapDataset`` answers by drawing another sample."""

    def __init__(self, mapper):
        self.mapper = mapper
        self.is_train = getattr(mapper, "is_train", True)

    def __repr__(self) -> str:
        return f"Detectron2Mapper({self.mapper!r})"

    @property
    def needs_dataset(self) -> bool:
        """Whether the mapper draws from the training list itself (kMaX's copy-paste)."""
        return bool(getattr(self.mapper, "needs_dataset", False))

    def bind_dataset(self, dataset) -> None:
        self.mapper.bind_dataset(dataset)

    def __call__(self, dataset_dict: dict):
        try:
            out = self.mapper(dataset_dict)
        except BadSampleError as e:
            if not self.is_train:
                raise
            logger.warning("skipping a training sample: %s", e)
            return None
        if "instances" in out:
            out["instances"] = to_detectron2_instances(out["instances"], bitmask_fields=("gt_masks",))
        return out


def build_mapper(cfg, is_train: bool = True) -> Detectron2Mapper:
    """The mapper named by INPUT.DATASET_MAPPER_NAME, for ``build_detection_train_loader(cfg,
    mapper=...)`` (``is_train=True``) or ``build_detection_test_loader(cfg, name, mapper=...)``."""
    return Detectron2Mapper(_build_our_mapper(cfg, is_train))
