"""Semantic segmentation metrics from a confusion matrix.

The prediction of an image is the per-pixel argmax of ``outputs[i]["sem_seg"]`` (K, H, W). The
GT is the label PNG named by the dataset dict's ``sem_seg_file_name`` (taken from the input
dict if present, else looked up by ``file_name`` in :data:`DatasetCatalog`). GT pixels equal to
the ignore label are left out of every metric.

With ``n[c, g]`` the number of pixels predicted ``c`` with GT ``g`` (ignored pixels excluded),
``TP_k = n[k, k]``, ``GT_k = sum_c n[c, k]``, ``Pred_k = sum_g n[k, g]``:

* ``IoU-k = TP_k / (GT_k + Pred_k - TP_k)``, ``ACC-k = TP_k / GT_k``;
* ``mIoU`` / ``mACC``: means over the classes present in the GT (``GT_k > 0``); the per-class
  values of the other classes are NaN;
* ``fwIoU = sum_k GT_k / sum_j GT_j * IoU-k`` over the same classes;
* ``pACC = sum_k TP_k / sum_k GT_k``.

All values are in percent, under Detectron2's names. (This is Detectron2's definition since
July 2022; older versions divided the mIoU sum by the number of classes present in the GT *or*
the prediction. The two agree whenever every class occurs in the GT, as on full benchmark
validation sets.)
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np

from ..data.catalog import DatasetCatalog, MetadataCatalog
from ..data.ids import contiguous_to_dataset
from ..data.image_io import read_label_map
from ..utils import comm
from .evaluator import DatasetEvaluator
from .files import write_json

__all__ = ["SemSegEvaluator", "load_sem_seg_gt", "confusion_matrix", "sem_seg_metrics"]

logger = logging.getLogger(__name__)


def load_sem_seg_gt(path: str) -> np.ndarray:
    """A label map as an int64 (H, W) array (8- or 16-bit PNG, or ``.npy``); a missing, corrupt
    or multi-channel file raises :class:`~mask2former.data.image_io.BadSampleError` naming it."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.int64)
    return read_label_map(path).astype(np.int64)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_label: Optional[int]) -> np.ndarray:
    """(K + 1, K + 1) int64 counts indexed ``[pred, gt]``; the last column holds GT-ignored pixels.

    Raises ValueError for GT values outside ``[0, K)`` that are not the ignore label, and for
    predictions outside ``[0, K)``.
    """
    pred = np.asarray(pred).astype(np.int64).reshape(-1)
    gt = np.asarray(gt).astype(np.int64).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels but the GT has {gt.size}")
    k = int(num_classes)
    if ignore_label is not None:
        gt = np.where(gt == ignore_label, k, gt)
    bad = (gt < 0) | (gt > k)
    if ignore_label is None:
        bad |= gt == k
    if bad.any():
        vals = np.unique(gt[bad])[:10].tolist()
        raise ValueError(
            f"GT labels {vals} are neither in [0, {k}) nor the ignore label ({ignore_label})"
        )
    if pred.size and (pred.min() < 0 or pred.max() >= k):
        raise ValueError(f"predicted labels must lie in [0, {k}); got [{pred.min()}, {pred.max()}]")
    return np.bincount((k + 1) * pred + gt, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)


def sem_seg_metrics(conf: np.ndarray, class_names: List[str]) -> Dict[str, float]:
    """mIoU, fwIoU, IoU-<name>, mACC, pACC, ACC-<name> (percent) from a ``[pred, gt]`` matrix."""
    k = conf.shape[0] - 1
    c = conf[:k, :k].astype(np.float64)  # ignored GT pixels (last column) are left out
    tp = np.diag(c)
    pos_gt = c.sum(axis=0)
    pos_pred = c.sum(axis=1)
    union = pos_gt + pos_pred - tp
    acc = np.full(k, np.nan)
    iou = np.full(k, np.nan)
    acc_valid = pos_gt > 0
    iou_valid = acc_valid & (union > 0)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total_gt = pos_gt.sum()
    nan = float("nan")
    miou = float(iou[iou_valid].mean()) if iou_valid.any() else nan
    macc = float(acc[acc_valid].mean()) if acc_valid.any() else nan
    fwiou = float((iou[iou_valid] * pos_gt[iou_valid] / total_gt).sum()) if total_gt > 0 else nan
    pacc = float(tp.sum() / total_gt) if total_gt > 0 else nan

    res: Dict[str, float] = OrderedDict()
    res["mIoU"] = 100 * miou
    res["fwIoU"] = 100 * fwiou
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = 100 * float(iou[i])
    res["mACC"] = 100 * macc
    res["pACC"] = 100 * pacc
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = 100 * float(acc[i])
    return res


class SemSegEvaluator(DatasetEvaluator):
    """mIoU / fwIoU / mACC / pACC of ``sem_seg`` outputs.

    Args:
        dataset_name: name in :data:`MetadataCatalog` (``stuff_classes``, ``ignore_label``) and,
            unless the inputs carry ``sem_seg_file_name``, in :data:`DatasetCatalog`.
        num_classes: number of classes; default ``len(stuff_classes)`` (must agree with it
            when both are known).
        ignore_label: GT label left out of the metrics; default the metadata's ``ignore_label``.
        distributed: gather the confusion matrices of all processes on rank 0.
        output_dir: if given, ``sem_seg_predictions.json`` (per image and class, an RLE of the
            predicted mask with the dataset category id) and ``sem_seg_evaluation.json`` (the
            metrics) are written there.
        sem_seg_loading_fn: reads a GT file into an integer (H, W) array.
    """

    def __init__(
        self,
        dataset_name: str,
        num_classes: Optional[int] = None,
        ignore_label: Optional[int] = None,
        *,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        sem_seg_loading_fn: Callable[[str], np.ndarray] = load_sem_seg_gt,
    ):
        self._dataset_name = dataset_name
        meta = MetadataCatalog.get(dataset_name)
        names = meta.get("stuff_classes")
        if names is not None and num_classes is not None and len(names) != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but dataset {dataset_name!r} has {len(names)} stuff_classes"
            )
        if names is None:
            if num_classes is None:
                raise ValueError(
                    f"SemSegEvaluator: dataset {dataset_name!r} has no stuff_classes; pass num_classes"
                )
            names = [str(i) for i in range(num_classes)]
        self._class_names = list(names)
        self._num_classes = len(self._class_names)
        self._ignore_label = ignore_label if ignore_label is not None else meta.get("ignore_label")
        self._distributed = distributed
        self._output_dir = output_dir
        self._loading_fn = sem_seg_loading_fn
        self._file_to_gt: Optional[Dict[str, str]] = None
        # Contiguous id -> dataset id, for the json dump only; used if it covers every class.
        inv = contiguous_to_dataset(meta, "stuff")
        self._c2d = inv if all(i in inv for i in range(self._num_classes)) else None
        self.reset()

    def reset(self) -> None:
        k = self._num_classes + 1
        self._conf = np.zeros((k, k), dtype=np.int64)
        self._predictions: List[dict] = []

    def _gt_path(self, inp: dict) -> str:
        if inp.get("sem_seg_file_name"):
            return inp["sem_seg_file_name"]
        if self._file_to_gt is None:
            self._file_to_gt = {
                d["file_name"]: d["sem_seg_file_name"]
                for d in DatasetCatalog.get(self._dataset_name)
                if "sem_seg_file_name" in d
            }
        name = inp.get("file_name")
        if name not in self._file_to_gt:
            raise ValueError(
                f"No semantic GT for image {name!r}: it is not a file_name with a "
                f"sem_seg_file_name in dataset {self._dataset_name!r}"
            )
        return self._file_to_gt[name]

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            scores = out["sem_seg"]
            if scores.dim() != 3 or scores.shape[0] != self._num_classes:
                raise ValueError(
                    f"sem_seg must be ({self._num_classes}, H, W) scores; got shape {tuple(scores.shape)}"
                )
            pred = scores.argmax(dim=0).cpu().numpy().astype(np.int64)
            gt = self._loading_fn(self._gt_path(inp))
            if gt.shape != pred.shape:
                raise ValueError(
                    f"Image {inp.get('file_name')!r}: prediction is {pred.shape[0]}x{pred.shape[1]} "
                    f"but the GT is {gt.shape[0]}x{gt.shape[1]}"
                )
            self._conf += confusion_matrix(pred, gt, self._num_classes, self._ignore_label)
            if self._output_dir:
                self._predictions.extend(self._encode_json(pred, inp.get("file_name")))

    def _encode_json(self, pred: np.ndarray, file_name: Optional[str]) -> List[dict]:
        from pycocotools import mask as mask_util

        out = []
        for label in np.unique(pred).tolist():
            rle = mask_util.encode(np.asfortranarray((pred == label).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("utf-8")
            cat = self._c2d[label] if self._c2d is not None else label
            out.append({"file_name": file_name, "category_id": cat, "segmentation": rle})
        return out

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        conf, predictions = self._conf, self._predictions
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            confs = comm.gather(conf)
            preds = comm.gather(predictions)
            if not comm.is_main_process():
                return {}
            conf = np.sum(confs, axis=0)
            predictions = [p for part in preds for p in part]
        res = sem_seg_metrics(conf, self._class_names)
        if self._output_dir:
            write_json(os.path.join(self._output_dir, "sem_seg_predictions.json"), predictions)
            write_json(os.path.join(self._output_dir, "sem_seg_evaluation.json"), res, indent=1)
        logger.info(
            "Semantic segmentation: mIoU=%.3f fwIoU=%.3f mACC=%.3f pACC=%.3f",
            res["mIoU"], res["fwIoU"], res["mACC"], res["pACC"],
        )
        return OrderedDict({"sem_seg": res})
