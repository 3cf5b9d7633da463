"""Saving predictions in the COCO formats, category ids mapped back to the dataset's.

Under one folder ``root`` (every file is written atomically: a partial file never remains):

* :class:`PanopticExporter`: ``panoptic/<name>.png`` (segment ids as ``R + 256 G + 256^2 B``) and
  ``panoptic.json`` (``{"annotations": [{"image_id", "file_name", "segments_info"}],
  "categories"}``, each segment with ``id, category_id, isthing, area, bbox (XYWH), iscrowd``);
* :class:`InstancesExporter`: ``instances.json`` (COCO result list, RLE ``segmentation``, ``bbox``);
* :class:`SemSegExporter`: ``sem_seg/<name>.png`` (per-pixel contiguous class index of
  ``stuff_classes``, uint8, or uint16 beyond 256 classes);
* :class:`PredictionExporter`: the three together, for a model's output dicts.

``image_id`` is the image's name. The JSON files are written by ``close()``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence

import numpy as np

from ..data.ids import contiguous_to_dataset
from ..evaluation.files import atomic_write, panoptic_png, write_image, write_json
from ..evaluation.instance_evaluation import instances_to_coco_json
from ..utils.visualizer import TASK_OUTPUTS, pick_output

__all__ = ["DatasetCategoryIds", "PanopticExporter", "InstancesExporter", "SemSegExporter", "PredictionExporter"]

logger = logging.getLogger("mask2former.demo")


class DatasetCategoryIds:
    """Contiguous class -> dataset category id, from the metadata's ``thing_`` / ``stuff_``
    ``dataset_id_to_contiguous_id`` tables (the one of ``isthing`` first). Without tables a class
    keeps its id; a class in neither table is saved as is, with one warning."""

    def __init__(self, metadata: Any):
        self.metadata = metadata
        self.thing = contiguous_to_dataset(metadata, "thing")
        self.stuff = contiguous_to_dataset(metadata, "stuff")
        self._unmapped: set = set()

    def __call__(self, contiguous_id: int, isthing: bool) -> int:
        tables = (self.thing, self.stuff) if isthing else (self.stuff, self.thing)
        for table in tables:
            if contiguous_id in table:
                return table[contiguous_id]
        if (self.thing or self.stuff) and contiguous_id not in self._unmapped:
            self._unmapped.add(contiguous_id)
            logger.warning("class %d is in neither dataset_id_to_contiguous_id table of %r; saved as is",
                           contiguous_id, self.metadata.get("name", "?"))
        return int(contiguous_id)


def _segment_box(mask: np.ndarray) -> List[int]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


class PanopticExporter:
    """``panoptic_seg`` outputs -> COCO panoptic PNGs and ``panoptic.json`` (see the module)."""

    def __init__(self, root: str, metadata: Any, num_classes: int, ids: Optional[DatasetCategoryIds] = None):
        self.root, self.metadata, self.num_classes = root, metadata, int(num_classes)
        self.ids = ids or DatasetCategoryIds(metadata)
        self.annotations: List[dict] = []

    def add(self, name: str, seg: Any, segments_info: Sequence[dict]) -> str:
        """Save one image's (H, W) segment ids and their ``segments_info``; returns the PNG path."""
        seg = seg.cpu().numpy() if hasattr(seg, "cpu") else np.asarray(seg)
        path = os.path.join(self.root, "panoptic", name + ".png")
        atomic_write(path, panoptic_png(seg))
        infos = []
        for s in segments_info:
            mask = seg == int(s["id"])
            isthing = bool(s.get("isthing", True))
            infos.append({"id": int(s["id"]), "category_id": self.ids(int(s["category_id"]), isthing),
                          "isthing": isthing, "area": int(mask.sum()), "bbox": _segment_box(mask), "iscrowd": 0})
        self.annotations.append({"image_id": name, "file_name": name + ".png", "segments_info": infos})
        return path

    def categories(self) -> List[dict]:
        """``[{"id", "name", "isthing"}]`` of every class, with dataset ids."""
        names = list(self.metadata.get("stuff_classes") or self.metadata.get("thing_classes") or [])
        # without a thing table the model treats every class as a thing
        things = set(self.ids.thing) if self.ids.thing else set(range(self.num_classes))
        return [{"id": self.ids(c, c in things), "name": names[c] if c < len(names) else f"class {c}",
                 "isthing": int(c in things)} for c in range(self.num_classes)]

    def close(self) -> List[str]:
        if not self.annotations:
            return []
        return [write_json(os.path.join(self.root, "panoptic.json"),
                           {"annotations": self.annotations, "categories": self.categories()})]


class InstancesExporter:
    """``instances`` outputs -> ``instances.json`` (see the module)."""

    def __init__(self, root: str, ids: DatasetCategoryIds):
        self.root, self.ids = root, ids
        self.records: List[dict] = []

    def add(self, name: str, instances: Any) -> None:
        records = instances_to_coco_json(instances, name, with_bbox=True)
        for r in records:
            r["category_id"] = self.ids(int(r["category_id"]), True)
        self.records.extend(records)

    def close(self) -> List[str]:
        return [write_json(os.path.join(self.root, "instances.json"), self.records)] if self.records else []


class SemSegExporter:
    """``sem_seg`` scores -> label PNGs of the argmax class (see the module)."""

    def __init__(self, root: str, num_classes: int):
        self.root = root
        self.dtype = np.uint8 if int(num_classes) <= 256 else np.uint16

    def add(self, name: str, sem_seg: Any) -> str:
        labels = sem_seg.argmax(0).cpu().numpy().astype(self.dtype)
        return write_image(os.path.join(self.root, "sem_seg", name + ".png"), labels)


class PredictionExporter:
    """Saves every output of a model's prediction dicts (only that of ``task`` when given) with
    the exporters above, under ``root``."""

    def __init__(self, root: str, metadata: Any, num_classes: int):
        ids = DatasetCategoryIds(metadata)
        self.panoptic = PanopticExporter(root, metadata, num_classes, ids)
        self.instances = InstancesExporter(root, ids)
        self.sem_seg = SemSegExporter(root, num_classes)

    def add(self, name: str, predictions: dict, task: Optional[str] = None) -> List[str]:
        """Save the outputs of one image. Returns the files written."""
        keys = [pick_output(predictions, task)] if task else [k for k in TASK_OUTPUTS.values() if k in predictions]
        written = []
        if "panoptic_seg" in keys:
            written.append(self.panoptic.add(name, *predictions["panoptic_seg"]))
        if "instances" in keys:
            self.instances.add(name, predictions["instances"])
        if "sem_seg" in keys:
            written.append(self.sem_seg.add(name, predictions["sem_seg"]))
        return written

    def close(self) -> List[str]:
        """Write the JSON files; returns their paths."""
        return self.panoptic.close() + self.instances.close()
