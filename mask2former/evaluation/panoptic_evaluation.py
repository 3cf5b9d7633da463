"""Panoptic Quality (PQ) evaluation in the COCO panoptic format.

The metric follows the definitions of the COCO panoptic API (``panopticapi.evaluation``),
re-implemented here because the published package pins ``numpy<2``:

* A ground-truth (GT) segment and a predicted segment of the same category match when their
  IoU is greater than 0.5 (so each segment matches at most one other). In the IoU, the union
  leaves out the predicted pixels that fall on VOID in the GT.
* VOID is id 0 in a segmentation map (``panoptic_seg`` pixels with id 0 or negative ids from
  the model become 0). Crowd GT segments (``iscrowd == 1``) are never matched and never count
  as false negatives.
* An unmatched prediction is a false positive unless more than half of its pixels lie on GT VOID
  or on the crowd region of its own category; then it is ignored.
* Per category: ``PQ = sum(IoU of matches) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU) / TP``
  (0 without matches), ``RQ = TP / (TP + FP/2 + FN/2)``. The category averages ("All",
  "Things", "Stuff") are over the categories of the GT json with at least one TP, FP or FN.
* GT segment areas are read from the GT json (``area``), predicted areas are pixel counts.

Where the reference script would fail, this module raises a ``ValueError`` that names the
image and segment (ids in the prediction map but not in ``segments_info`` or vice versa,
unknown categories, images without a prediction). An average over no categories (e.g.
"Stuff" on a dataset without stuff) is reported as NaN instead of failing.
"""
from __future__ import annotations

import io
import json
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..data.catalog import MetadataCatalog
from ..utils import comm
from .evaluator import DatasetEvaluator

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

OFFSET = 256 * 256 * 256  # segment ids must fit in an RGB PNG
VOID = 0


# --------------------------------------------------------------------------- #
# id <-> RGB encoding of COCO panoptic PNGs
# --------------------------------------------------------------------------- #
def rgb2id(color: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) int64 segment ids, ``id = R + 256 G + 256^2 B``."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] < 3:
        raise ValueError(f"rgb2id expects an (H, W, 3) array; got shape {color.shape}")
    c = color[..., :3].astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) non-negative segment ids (< 256^3) -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(id_map).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"segment ids must lie in [0, {OFFSET}); got [{ids.min()}, {ids.max()}]")
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    for i in range(3):
        rgb[..., i] = ids % 256
        ids = ids // 256
    return rgb


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #
class PQStatCat:
    """Sum of matched IoUs and TP / FP / FN counts of one category."""

    __slots__ = ("iou", "tp", "fp", "fn")

    def __init__(self, iou: float = 0.0, tp: int = 0, fp: int = 0, fn: int = 0):
        self.iou, self.tp, self.fp, self.fn = float(iou), int(tp), int(fp), int(fn)

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self

    def __getstate__(self):
        return (self.iou, self.tp, self.fp, self.fn)

    def __setstate__(self, state):
        self.iou, self.tp, self.fp, self.fn = state

    def __repr__(self) -> str:
        return f"PQStatCat(iou={self.iou:.4f}, tp={self.tp}, fp={self.fp}, fn={self.fn})"


class PQStat:
    """Per-category :class:`PQStatCat`, indexed by dataset category id; ``+=`` accumulates."""

    def __init__(self):
        self.pq_per_cat: Dict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for cat, stat in other.pq_per_cat.items():
            self.pq_per_cat[cat] += stat
        return self

    def __repr__(self) -> str:
        return f"PQStat({dict(self.pq_per_cat)})"

    def pq_average(self, categories: Mapping[int, Mapping[str, Any]], isthing: Optional[bool]):
        return pq_average(self, categories, isthing)


def _categories_dict(categories: Union[Mapping[int, Mapping], Sequence[Mapping]]) -> Dict[int, Mapping]:
    if isinstance(categories, Mapping):
        return dict(categories)
    return {c["id"]: c for c in categories}


def pq_average(
    stat: PQStat, categories: Union[Mapping[int, Mapping], Sequence[Mapping]], isthing: Optional[bool]
) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]]]:
    """Averages PQ / SQ / RQ over ``categories`` (all if ``isthing`` is None, else things or stuff).

    Categories without any TP, FP or FN are left out of the average (their per-class entry is
    all zeros). Returns ``({"pq", "sq", "rq", "n"}, {category_id: {"pq", "sq", "rq"}})``, values
    in [0, 1]; the average is NaN when ``n == 0``.
    """
    cats = _categories_dict(categories)
    pq = sq = rq = 0.0
    n = 0
    per_class: Dict[int, Dict[str, float]] = {}
    for cat_id, info in cats.items():
        if isthing is not None and (info.get("isthing", 0) == 1) != isthing:
            continue
        s = stat.pq_per_cat.get(cat_id, PQStatCat())
        denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
        if s.tp + s.fp + s.fn == 0:
            per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        pq_c = s.iou / denom
        sq_c = s.iou / s.tp if s.tp != 0 else 0.0
        rq_c = s.tp / denom
        per_class[cat_id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
        pq += pq_c
        sq += sq_c
        rq += rq_c
    if n == 0:
        return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def pq_results(stat: PQStat, categories) -> Dict[str, Any]:
    """``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {...}}`` (0..1)."""
    res: Dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        res[name], per_class = pq_average(stat, categories, isthing)
        if name == "All":
            res["per_class"] = per_class
    return res


def pq_results_to_metrics(res: Mapping[str, Any]) -> Dict[str, float]:
    """Detectron2's metric names, in percent: PQ, SQ, RQ, PQ_th, ..., RQ_st."""
    out: Dict[str, float] = OrderedDict()
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for k in ("pq", "sq", "rq"):
            out[k.upper() + suffix] = 100.0 * float(res[group][k])
    return out


# --------------------------------------------------------------------------- #
# One image
# --------------------------------------------------------------------------- #
def _segments_by_id(segments: Iterable[Mapping], what: str, image_id: Any) -> Dict[int, dict]:
    out: Dict[int, dict] = {}
    for s in segments:
        sid = int(s["id"])
        if sid in out:
            raise ValueError(f"Image {image_id!r}: {what} segment id {sid} appears twice in segments_info")
        out[sid] = dict(s)
    return out


def _as_id_map(seg: Any, what: str) -> np.ndarray:
    if hasattr(seg, "detach"):
        seg = seg.detach().cpu().numpy()
    seg = np.asarray(seg)
    if seg.ndim == 3 and seg.shape[2] == 3:
        seg = rgb2id(seg)
    if seg.ndim != 2:
        raise ValueError(f"{what} segmentation must be an (H, W) id map; got shape {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"{what} segmentation must hold integer ids; got dtype {seg.dtype}")
    seg = seg.astype(np.int64)
    if seg.size and (seg.min() < 0 or seg.max() >= OFFSET):
        raise ValueError(f"{what} segment ids must lie in [0, {OFFSET}); got [{seg.min()}, {seg.max()}]")
    return seg


def pq_compute_single(
    gt_seg: np.ndarray,
    gt_segments: Sequence[Mapping],
    pred_seg: np.ndarray,
    pred_segments: Sequence[Mapping],
    categories: Union[Mapping[int, Mapping], Sequence[Mapping]],
    *,
    image_id: Any = None,
) -> PQStat:
    """PQ statistics of one image.

    Args:
        gt_seg, pred_seg: (H, W) integer segment-id maps (or (H, W, 3) RGB-encoded), 0 = VOID.
        gt_segments: GT ``segments_info``: ``{"id", "category_id", "iscrowd", "area"}``; a
            missing ``area`` is counted from ``gt_seg``, a missing ``iscrowd`` is 0.
        pred_segments: predicted ``segments_info``: ``{"id", "category_id"}``; every non-zero id
            in ``pred_seg`` must be listed and every listed id must occur in ``pred_seg``.
        categories: the dataset categories (``{id: {"isthing": 0/1, ...}}`` or a list of dicts
            with "id"); predicted categories must be among them. Category ids are dataset ids
            (as in the GT json), the same for GT and prediction.
        image_id: only used in error messages.
    """
    cats = _categories_dict(categories)
    gt = _as_id_map(gt_seg, "GT")
    pred = _as_id_map(pred_seg, "Predicted")
    if gt.shape != pred.shape:
        raise ValueError(
            f"Image {image_id!r}: predicted segmentation has shape {pred.shape} but the GT has {gt.shape}"
        )
    gt_segms = _segments_by_id(gt_segments, "GT", image_id)
    pred_segms = _segments_by_id(pred_segments, "predicted", image_id)
    if VOID in pred_segms:
        raise ValueError(f"Image {image_id!r}: predicted segment id {VOID} is reserved for VOID")

    # Predicted areas, and consistency between the id map and segments_info.
    unlisted = set(pred_segms)
    labels, counts = np.unique(pred, return_counts=True)
    for label, cnt in zip(labels.tolist(), counts.tolist()):
        if label == VOID:
            continue
        if label not in pred_segms:
            raise ValueError(
                f"Image {image_id!r}: segment id {label} occurs in the predicted segmentation "
                f"but not in its segments_info"
            )
        pred_segms[label]["area"] = cnt
        unlisted.discard(label)
        if pred_segms[label]["category_id"] not in cats:
            raise ValueError(
                f"Image {image_id!r}: predicted segment {label} has category_id "
                f"{pred_segms[label]['category_id']!r}, which is not a category of the dataset"
            )
    if unlisted:
        raise ValueError(
            f"Image {image_id!r}: segments {sorted(unlisted)} are listed in segments_info but have "
            f"no pixel in the predicted segmentation"
        )
    need_gt_area = [sid for sid, s in gt_segms.items() if "area" not in s]
    if need_gt_area:
        gl, gc = np.unique(gt, return_counts=True)
        gt_counts = dict(zip(gl.tolist(), gc.tolist()))
        for sid in need_gt_area:
            gt_segms[sid]["area"] = gt_counts.get(sid, 0)

    # Pixel counts of every (GT id, predicted id) pair.
    joint = gt.astype(np.uint64) * np.uint64(OFFSET) + pred.astype(np.uint64)
    pairs, inter = np.unique(joint, return_counts=True)
    overlap: Dict[Tuple[int, int], int] = {
        (int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs.tolist(), inter.tolist())
    }

    stat = PQStat()
    gt_matched, pred_matched = set(), set()
    for (gl, pl), intersection in overlap.items():
        g = gt_segms.get(gl)
        p = pred_segms.get(pl)
        if g is None or p is None:
            continue
        if g.get("iscrowd", 0) == 1 or g["category_id"] != p["category_id"]:
            continue
        union = p["area"] + g["area"] - intersection - overlap.get((VOID, pl), 0)
        iou = intersection / union
        if iou > 0.5:
            stat[g["category_id"]].tp += 1
            stat[g["category_id"]].iou += iou
            gt_matched.add(gl)
            pred_matched.add(pl)

    # Unmatched GT: false negatives, except crowd regions (remembered per category; as in the
    # reference, one crowd segment per category is used -- the last one listed).
    crowd_of_cat: Dict[int, int] = {}
    for gl, g in gt_segms.items():
        if gl in gt_matched:
            continue
        if g.get("iscrowd", 0) == 1:
            crowd_of_cat[g["category_id"]] = gl
            continue
        stat[g["category_id"]].fn += 1

    # Unmatched predictions: false positives unless mostly on VOID / same-category crowd.
    for pl, p in pred_segms.items():
        if pl in pred_matched:
            continue
        ignored = overlap.get((VOID, pl), 0)
        if p["category_id"] in crowd_of_cat:
            ignored += overlap.get((crowd_of_cat[p["category_id"]], pl), 0)
        if ignored / p["area"] > 0.5:
            continue
        stat[p["category_id"]].fp += 1
    return stat


# --------------------------------------------------------------------------- #
# Evaluator
# --------------------------------------------------------------------------- #
def _read_panoptic_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint32)
    return rgb2id(arr)


def _png_bytes(id_map: np.ndarray) -> bytes:
    with io.BytesIO() as buf:
        Image.fromarray(id2rgb(id_map)).save(buf, format="PNG")
        return buf.getvalue()


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
        self._thing_c2d = {int(v): k for k, v in (self._metadata.get("thing_dataset_id_to_contiguous_id") or {}).items()}
        self._stuff_c2d = {int(v): k for k, v in (self._metadata.get("stuff_dataset_id_to_contiguous_id") or {}).items()}
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
                        "png_string": _png_bytes(seg),
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
        _log_table(res)
        return OrderedDict({"panoptic_seg": metrics})

    def _write_predictions(self, predictions: List[dict]) -> None:
        folder = os.path.join(self._output_dir, "predictions")
        os.makedirs(folder, exist_ok=True)
        annotations = []
        for p in predictions:
            p = dict(p)
            with open(os.path.join(folder, p["file_name"]), "wb") as f:
                f.write(p.pop("png_string"))
            annotations.append(p)
        data = dict(self._load_gt()["json"])
        data["annotations"] = annotations
        path = os.path.join(self._output_dir, "predictions.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, default=_json_default)
        logger.info("Wrote %d panoptic predictions to %s", len(annotations), path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _log_table(res: Mapping[str, Any]) -> None:
    lines = [f"{'':8s}| {'PQ':>7s} {'SQ':>7s} {'RQ':>7s} {'#categories':>12s}", "-" * 46]
    for name in ("All", "Things", "Stuff"):
        r = res[name]
        lines.append(
            f"{name:8s}| {100 * r['pq']:7.3f} {100 * r['sq']:7.3f} {100 * r['rq']:7.3f} {r['n']:12d}"
        )
    logger.info("Panoptic evaluation results:\n%s", "\n".join(lines))
