"""COCO-style instance segmentation AP with pycocotools.

Predictions (``outputs[i]["instances"]``: ``pred_masks`` (N, H, W), ``scores``, ``pred_classes``
with contiguous thing ids) are converted to COCO results (masks as compressed RLE, category ids
mapped back to dataset ids with the inverse of ``thing_dataset_id_to_contiguous_id``) and
scored by ``pycocotools.cocoeval.COCOeval`` against the instances json named by the metadata's
``json_file``.

Reported, in percent and under Detectron2's names: ``AP``, ``AP50``, ``AP75``, ``APs``,
``APm``, ``APl`` and ``AP-<class name>`` per category. A metric that COCOeval cannot compute
(e.g. ``APs`` without small GT objects) is NaN. Without any prediction, AP is 0 for every
category that has GT (pycocotools cannot load an empty result list, so the empty result set
is built directly). The ``bbox`` task (boxes derived from the predicted masks) is off by
default.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..data.catalog import MetadataCatalog
from ..data.ids import category_table, contiguous_to_dataset
from ..utils import comm
from .evaluator import DatasetEvaluator
from .files import write_json

__all__ = ["InstanceSegEvaluator", "COCOEvaluator", "instances_to_coco_json", "coco_eval_results"]

logger = logging.getLogger(__name__)

_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def instances_to_coco_json(instances: Any, image_id: Any, *, with_bbox: bool = False) -> List[dict]:
    """COCO result dicts (contiguous ``category_id``) of one image's ``Instances``.

    Masks are binarised (floating masks at 0.5) and encoded as compressed RLE with its
    ``counts`` as a str. ``with_bbox`` adds the XYWH box of each mask.
    """
    from pycocotools import mask as mask_util

    n = len(instances)
    if n == 0:
        return []
    if not instances.has("pred_masks"):
        raise ValueError("InstanceSegEvaluator needs Instances with pred_masks")
    masks = _to_numpy(instances.pred_masks)
    if masks.ndim != 3:
        raise ValueError(f"pred_masks must be (N, H, W); got shape {masks.shape}")
    masks = masks > 0.5 if np.issubdtype(masks.dtype, np.floating) else masks.astype(bool)
    scores = _to_numpy(instances.scores).reshape(-1).tolist()
    classes = _to_numpy(instances.pred_classes).reshape(-1).tolist()
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_util.toBbox(rles).tolist() if with_bbox else None
    results = []
    for k in range(n):
        rle = dict(rles[k])
        rle["counts"] = rle["counts"].decode("utf-8")
        r = {"image_id": image_id, "category_id": int(classes[k]), "score": float(scores[k]),
             "segmentation": rle}
        if boxes is not None:
            r["bbox"] = [float(v) for v in boxes[k]]
        results.append(r)
    return results


def _empty_results(coco_gt) -> Any:
    """A COCO result object without detections (``COCO.loadRes`` fails on an empty list)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset["images"] = list(coco_gt.dataset.get("images", []))
    res.dataset["categories"] = copy.deepcopy(coco_gt.dataset.get("categories", []))
    res.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_eval_results(
    coco_gt: Any,
    results: Sequence[dict],
    iou_type: str,
    *,
    img_ids: Optional[Iterable[Any]] = None,
    max_dets_per_image: int = 100,
):
    """Runs COCOeval (``evaluate`` + ``accumulate``) and returns it.

    ``results`` are COCO result dicts with dataset category ids; for ``segm`` their boxes are
    dropped so that object areas (small / medium / large) are mask areas, as in Detectron2.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox'; got {iou_type!r}")
    results = copy.deepcopy(list(results))
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    else:
        for r in results:
            if "bbox" not in r:
                raise ValueError("bbox evaluation needs a 'bbox' in every result")
            r.pop("segmentation", None)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, int(max_dets_per_image)]
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
    return ev


def _stats_from_eval(ev: Any) -> Dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (0..1, -1 when undefined) at the largest maxDets."""
    p = ev.params
    prec = ev.eval["precision"]  # (T iou thresholds, R recall thresholds, K cats, A areas, M maxDets)

    def summarize(iou: Optional[float] = None, area: str = "all") -> float:
        s = prec[..., p.areaRngLbl.index(area), len(p.maxDets) - 1]
        if iou is not None:
            s = s[np.where(np.isclose(p.iouThrs, iou))[0]]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    return {
        "AP": summarize(),
        "AP50": summarize(0.5),
        "AP75": summarize(0.75),
        "APs": summarize(area="small"),
        "APm": summarize(area="medium"),
        "APl": summarize(area="large"),
    }


class InstanceSegEvaluator(DatasetEvaluator):
    """COCO mask AP (and optionally box AP) of ``instances`` outputs.

    Args:
        dataset_name: a name known to :data:`MetadataCatalog` whose metadata has ``json_file``
            (COCO instances json) and, usually, ``thing_dataset_id_to_contiguous_id`` and
            ``thing_classes``.
        tasks: subset of ``("segm", "bbox")``; boxes are derived from the predicted masks.
        distributed: gather the predictions of all processes on rank 0.
        output_dir: if given, ``coco_instances_results.json`` (dataset category ids) is
            written there.
        max_dets_per_image: detections per image considered by COCOeval (default 100).
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] = ("segm",),
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: Optional[int] = None,
    ):
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in ("segm", "bbox")]
        if bad or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of ('segm', 'bbox'); got {tasks}")
        self._tasks = tasks
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets = int(max_dets_per_image) if max_dets_per_image is not None else 100
        self._metadata = MetadataCatalog.get(dataset_name)
        json_file = self._metadata.get("json_file")
        if not json_file:
            raise ValueError(
                f"InstanceSegEvaluator needs metadata 'json_file' (COCO instances json) for "
                f"dataset {dataset_name!r}"
            )
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self._coco_gt = COCO(json_file)
        self._do_evaluation = "annotations" in self._coco_gt.dataset
        # None: no table, the model predicts the dataset's ids
        has_table = self._metadata.get("thing_dataset_id_to_contiguous_id") is not None
        self._c2d = contiguous_to_dataset(self._metadata, "thing") if has_table else None
        self._warned_unknown_gt_cat = False
        self.reset()

    def reset(self) -> None:
        self._predictions: Dict[Any, List[dict]] = {}

    def _dataset_category(self, contiguous_id: int, image_id: Any) -> Any:
        if self._c2d is None:
            if contiguous_id not in self._coco_gt.cats:
                raise ValueError(
                    f"Image {image_id!r}: predicted category {contiguous_id} is not a category of "
                    f"{self._metadata.json_file}"
                )
            return contiguous_id
        if contiguous_id not in self._c2d:
            raise ValueError(
                f"Image {image_id!r}: predicted class {contiguous_id} is not in the "
                f"thing_dataset_id_to_contiguous_id table of dataset {self._dataset_name!r} "
                f"(contiguous thing ids: {sorted(self._c2d)})"
            )
        dataset_id = self._c2d[contiguous_id]
        if dataset_id not in self._coco_gt.cats and not self._warned_unknown_gt_cat:
            self._warned_unknown_gt_cat = True
            logger.warning(
                "Predicted category %r is not a category of %s; COCOeval ignores such predictions",
                dataset_id, self._metadata.json_file,
            )
        return dataset_id

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            if image_id not in self._coco_gt.imgs:
                raise ValueError(
                    f"Prediction for image id {image_id!r}, which is not an image of "
                    f"{self._metadata.json_file}"
                )
            if image_id in self._predictions:
                raise ValueError(f"Image id {image_id!r} was processed twice")
            if "instances" not in out:
                raise KeyError(f"Image {image_id!r}: model output has no 'instances' (keys: {sorted(out)})")
            instances = out["instances"]
            info = self._coco_gt.imgs[image_id]
            if len(instances) and "height" in info and "width" in info:
                h, w = tuple(instances.pred_masks.shape[-2:])
                if (h, w) != (info["height"], info["width"]):
                    raise ValueError(
                        f"Image {image_id!r}: predicted masks are {h}x{w} but the GT image is "
                        f"{info['height']}x{info['width']}"
                    )
            results = instances_to_coco_json(instances, image_id, with_bbox="bbox" in self._tasks)
            for r in results:
                r["category_id"] = self._dataset_category(r["category_id"], image_id)
            self._predictions[image_id] = results

    def evaluate(self, img_ids: Optional[Iterable[Any]] = None) -> Dict[str, Dict[str, float]]:
        """Metrics over ``img_ids`` (default: every image of the GT json, as Detectron2 does)."""
        predictions = self._predictions
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            parts = comm.gather(predictions)
            if not comm.is_main_process():
                return {}
            predictions = {}
            for part in parts:
                for image_id, res in part.items():
                    if image_id in predictions:
                        raise ValueError(f"Image id {image_id!r} was processed by two processes")
                    predictions[image_id] = res
        if not predictions:
            logger.warning("InstanceSegEvaluator received no predictions")
            return {}
        n_gt = len(self._coco_gt.imgs)
        if img_ids is None and len(predictions) < n_gt:
            logger.warning(
                "Only %d of the %d images of %s were processed; the others count as images "
                "without detections", len(predictions), n_gt, self._metadata.json_file,
            )
        coco_results = [r for res in predictions.values() for r in res]

        if self._output_dir:
            path = write_json(os.path.join(self._output_dir, "coco_instances_results.json"), coco_results)
            logger.info("Saved %d instance predictions to %s", len(coco_results), path)

        if not self._do_evaluation:
            logger.info("The GT json has no annotations; nothing to evaluate")
            return {}
        if not coco_results:
            logger.warning("No instance predicted on any image: AP is 0")

        results: Dict[str, Dict[str, float]] = OrderedDict()
        for task in self._tasks:
            ev = coco_eval_results(
                self._coco_gt, coco_results, task, img_ids=img_ids, max_dets_per_image=self._max_dets
            )
            results[task] = self._derive(ev, task)
        return results

    def _class_name(self, dataset_id: Any) -> str:
        """``thing_classes[contiguous id]`` where the thing ids are 0..N-1 (instance datasets, COCO
        panoptic); else ``stuff_classes[contiguous id]``: panoptic datasets whose things are spread
        over the contiguous ids (ADE20K, Mapillary Vistas, Cityscapes) list every class there."""
        table = category_table(self._metadata, "thing")
        if dataset_id in table:
            things = self._metadata.get("thing_classes")
            if things is not None and sorted(table.values()) == list(range(len(things))):
                return things[table[dataset_id]]
            stuff = self._metadata.get("stuff_classes")
            if stuff is not None and table[dataset_id] < len(stuff):
                return stuff[table[dataset_id]]
        return str(self._coco_gt.cats[dataset_id].get("name", dataset_id))

    def _derive(self, ev: Any, task: str) -> Dict[str, float]:
        stats = _stats_from_eval(ev)
        res: Dict[str, float] = OrderedDict(
            (k, 100.0 * v if v >= 0 else float("nan")) for k, v in stats.items()
        )
        prec = ev.eval["precision"]
        for k, cat_id in enumerate(ev.params.catIds):
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            res[f"AP-{self._class_name(cat_id)}"] = 100.0 * float(np.mean(p)) if p.size else float("nan")
        logger.info(
            "Evaluation results for %s: %s", task,
            "  ".join(f"{k}={res[k]:.3f}" for k in _METRICS),
        )
        return res


# Detectron2's COCOEvaluator plays the same role for instance-only datasets.
COCOEvaluator = InstanceSegEvaluator
