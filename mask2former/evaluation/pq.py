"""Panoptic Quality (PQ): per-image statistics and their averages, in the COCO panoptic format.

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

:func:`pq_compute_single` gives one image's :class:`PQStat`; ``+=`` accumulates them;
:func:`pq_results` averages them per category group and :func:`pq_results_to_metrics` names the
numbers as Detectron2 does. The evaluator that reads the GT and converts model outputs lives in
:mod:`mask2former.evaluation.panoptic_evaluation`.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.ids import PANOPTIC_ID_LIMIT, rgb2id

__all__ = [
    "PQStat",
    "PQStatCat",
    "pq_compute_single",
    "pq_average",
    "pq_results",
    "pq_results_to_metrics",
    "pq_table",
    "VOID",
]

VOID = 0


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
    if seg.size and (seg.min() < 0 or seg.max() >= PANOPTIC_ID_LIMIT):
        raise ValueError(f"{what} segment ids must lie in [0, {PANOPTIC_ID_LIMIT}); got [{seg.min()}, {seg.max()}]")
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
    joint = gt.astype(np.uint64) * np.uint64(PANOPTIC_ID_LIMIT) + pred.astype(np.uint64)
    pairs, inter = np.unique(joint, return_counts=True)
    overlap: Dict[Tuple[int, int], int] = {
        (int(p // PANOPTIC_ID_LIMIT), int(p % PANOPTIC_ID_LIMIT)): int(c)
        for p, c in zip(pairs.tolist(), inter.tolist())
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


def pq_table(res: Mapping[str, Any]) -> str:
    """The All / Things / Stuff rows of :func:`pq_results` as a text table (percent)."""
    lines = [f"{'':8s}| {'PQ':>7s} {'SQ':>7s} {'RQ':>7s} {'#categories':>12s}", "-" * 46]
    for name in ("All", "Things", "Stuff"):
        r = res[name]
        lines.append(
            f"{name:8s}| {100 * r['pq']:7.3f} {100 * r['sq']:7.3f} {100 * r['rq']:7.3f} {r['n']:12d}"
        )
    return "\n".join(lines)

