"""The COCO panoptic evaluator: model outputs -> PQ against COCO-panoptic GT files.

:class:`COCOPanopticEvaluator` reads the GT json and PNGs named by the dataset's metadata,
converts each ``panoptic_seg`` output (contiguous category ids, ``isthing``) to dataset category
ids, computes its PQ statistics image by image (:mod:`mask2former.evaluation.pq`, which defines
the metric) and optionally writes the predictions in COCO panoptic format.

``rgb2id``, ``id2rgb`` and ``OFFSET`` (now :mod:`mask2former.data.ids`) and the PQ functions
(now :mod:`mask2former.evaluation.pq`) stay importable from here.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..data.catalog import MetadataCatalog
from ..data.ids import PANOPTIC_ID_LIMIT as OFFSET  # noqa: F401  (alias; lives in data/ids.py)
from ..data.ids import contiguous_to_dataset, id2rgb, rgb2id  # noqa: F401  (id2rgb: alias)
from ..data.image_io import read_image
from ..utils import comm
from .evaluator import DatasetEvaluator
from .files import atomic_write, panoptic_png, write_json
from .pq import (  # noqa: F401  (pq_average, PQStatCat: aliases; they live in pq.py)
    VOID,
    PQStat,
    PQStatCat,
    pq_average,
    pq_compute_single,
    pq_results,
    pq_results_to_metrics,
    pq_table,
)

__all__ = [
    "COCOPanopticEvaluator",
    "PQStat",
    "PQStatCat",
    "pq_compute_single",
    "pq_average",
    "pq_results_to_metrics",
    "rgb2id",
    "id2rgb",
]

logger = logging.getLogger(__name__)


def _read_panoptic_png(path: str) -> np.ndarray:
    return rgb2id(read_image(path, "RGB"))


class COCOPanopticEvaluator(DatasetEvaluator):
    """PQ / SQ / RQ (All, Things, Stuff) of ``panoptic_seg`` outputs against COCO-panoptic GT.

    The GT is read from the dataset metadata: ``panoptic_json`` (COCO panoptic json: images,
    annotations with ``segments_info``, categories with ``isthing``) and ``panoptic_root`` (the
    folder of GT PNGs). Model outputs use contiguous category ids and ``isthing``; they are
    mapped back to dataset ids with the inverses of ``thing_dataset_id_to_contiguous_id`` and
    ``stuff_dataset_id_to_contiguous_id``. Segments without an ``isthing`` key are taken to carry
    dataset ids already. If ``segments_info`` is None, the map holds
    ``contiguous_class * label_divisor + instance`` labels with -1 for VOID (as in Detectron2).

    Statistics are computed image by image in :meth:`process` (GT PNGs are read there), so the
    evaluator keeps only counts in memory. With ``output_dir``, the predictions are written in
    COCO panoptic format: ``output_dir/predictions.json`` (the GT json with its annotations
    replaced by the predictions) and the PNGs in ``output_dir/predictions/``.

    Args:
        dataset_name: a name known to :data:`MetadataCatalog`.
        output_dir: where to write the predictions (optional).
        distributed: gather the statistics of all processes on rank 0.
        require_all_images: raise if GT images received no prediction (as the COCO panoptic API
            does); if False, only the images seen are evaluated and a warning is logged.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        require_all_images: bool = True,
    ):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = output_dir
        self._distributed = distributed
        self._require_all = require_all_images
        for key in ("panoptic_json", "panoptic_root"):
            if self._metadata.get(key) is None:
                raise ValueError(
                    f"COCOPanopticEvaluator needs metadata {key!r} for dataset {dataset_name!r} "
                    f"(the COCO panoptic GT json and PNG folder)"
                )
        self._thing_c2d = contiguous_to_dataset(self._metadata, "thing")
        self._stuff_c2d = contiguous_to_dataset(self._metadata, "stuff")
        self._gt: Optional[dict] = None
        self.reset()

    # -- GT ---------------------------------------------------------------- #
    def _load_gt(self) -> dict:
        if self._gt is None:
            with open(self._metadata.panoptic_json, "r", encoding="utf-8") as f:
                data = json.load(f)
            self._gt = {
                "json": data,
                "categories": {c["id"]: c for c in data["categories"]},
                "annotations": {a["image_id"]: a for a in data.get("annotations", [])},
            }
        return self._gt

    # -- conversion -------------------------------------------------------- #
    def _to_dataset_category(self, seg: Mapping, image_id: Any) -> dict:
        seg = dict(seg)
        isthing = seg.pop("isthing", None)
        if isthing is None:
            return seg
        cid = int(seg["category_id"])
        table = self._thing_c2d if isthing else self._stuff_c2d
        if cid not in table:
            kind = "thing" if isthing else "stuff"
            raise ValueError(
                f"Image {image_id!r}: predicted {kind} segment {seg.get('id')} has contiguous category "
                f"{cid}, which is not in the {kind}_dataset_id_to_contiguous_id table of dataset "
                f"{self._dataset_name!r} (known: {sorted(table)})"
            )
        seg["category_id"] = table[cid]
        return seg

    def _convert(self, panoptic_seg: Any, image_id: Any) -> Tuple[np.ndarray, List[dict]]:
        seg, segments_info = panoptic_seg
        if hasattr(seg, "detach"):
            seg = seg.detach().cpu().numpy()
        seg = np.asarray(seg).astype(np.int64)
        if segments_info is None:
            divisor = self._metadata.get("label_divisor")
            if divisor is None:
                raise ValueError(
                    f"panoptic_seg without segments_info needs metadata 'label_divisor' for "
                    f"dataset {self._dataset_name!r}"
                )
            thing_contiguous = set(self._thing_c2d)
            segments_info = []
            for label in np.unique(seg).tolist():
                if label < 0:
                    continue
                cls = label // divisor
                segments_info.append(
                    {"id": label + 1, "category_id": int(cls), "isthing": cls in thing_contiguous}
                )
            seg = np.where(seg < 0, -1, seg) + 1
        else:
            seg = np.where(seg < 0, VOID, seg)
        return seg, [self._to_dataset_category(s, image_id) for s in segments_info]

    # -- DatasetEvaluator -------------------------------------------------- #
    def reset(self) -> None:
        self._stats: Dict[Any, PQStat] = {}
        self._predictions: List[dict] = []

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        gt = self._load_gt()
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            gt_ann = gt["annotations"].get(image_id)
            if gt_ann is None:
                raise ValueError(
                    f"Prediction for image id {image_id!r}, which has no annotation in "
                    f"{self._metadata.panoptic_json}"
                )
            if image_id in self._stats:
                raise ValueError(f"Image id {image_id!r} was processed twice")
            seg, segments = self._convert(out["panoptic_seg"], image_id)
            gt_seg = _read_panoptic_png(os.path.join(self._metadata.panoptic_root, gt_ann["file_name"]))
            self._stats[image_id] = pq_compute_single(
                gt_seg, gt_ann["segments_info"], seg, segments, gt["categories"], image_id=image_id
            )
            if self._output_dir:
                src = inp.get("file_name") or gt_ann["file_name"]
                png_name = os.path.splitext(os.path.basename(src))[0] + ".png"
                self._predictions.append(
                    {
                        "image_id": image_id,
                        "file_name": png_name,
                        "png_string": panoptic_png(seg),
                        "segments_info": segments,
                    }
                )

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        stats, predictions = self._stats, self._predictions
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            all_stats = comm.gather(stats)
            all_preds = comm.gather(predictions)
            if not comm.is_main_process():
                return {}
            stats = {}
            for part in all_stats:
                for image_id, s in part.items():
                    if image_id in stats:
                        raise ValueError(f"Image id {image_id!r} was processed by two processes")
                    stats[image_id] = s
            predictions = [p for part in all_preds for p in part]

        gt = self._load_gt()
        missing = [i for i in gt["annotations"] if i not in stats]
        if missing:
            msg = (
                f"{len(missing)} of {len(gt['annotations'])} GT images of {self._dataset_name!r} have "
                f"no prediction (e.g. image ids {missing[:5]})"
            )
            if self._require_all:
                raise ValueError(msg + "; pass require_all_images=False to evaluate only the images seen")
            logger.warning(msg + "; evaluating only the %d images seen", len(stats))
        if not stats:
            logger.warning("COCOPanopticEvaluator received no predictions")
            return {}

        if self._output_dir:
            self._write_predictions(predictions)

        total = PQStat()
        for s in stats.values():
            total += s
        res = pq_results(total, gt["categories"])
        self.pq_results = res
        metrics = pq_results_to_metrics(res)
        logger.info("Panoptic evaluation results:\n%s", pq_table(res))
        return OrderedDict({"panoptic_seg": metrics})

    def _write_predictions(self, predictions: List[dict]) -> None:
        folder = os.path.join(self._output_dir, "predictions")
        os.makedirs(folder, exist_ok=True)
        annotations = []
        for p in predictions:
            p = dict(p)
            atomic_write(os.path.join(folder, p["file_name"]), p.pop("png_string"))
            annotations.append(p)
        data = dict(self._load_gt()["json"])
        data["annotations"] = annotations
        path = os.path.join(self._output_dir, "predictions.json")
        write_json(path, data)
        logger.info("Wrote %d panoptic predictions to %s", len(annotations), path)
