"""Post-processing of Mask2Former predictions into semantic, panoptic and instance results.

Small pure functions; the meta architecture chooses which to call.

Shape legend:
    Q   number of queries              K   number of classes (logits have K+1: the last is "no object")
    H, W   padded input size (masks are upsampled to it first)
    h, w   the image's size before padding
    oh, ow the requested output size ("height"/"width" of the input dict)
    N   number of instance detections (<= topk)

Panoptic and instance results depend on the masks of a few queries only (panoptic_keep,
instance_candidates): the meta architecture upsamples just those when semantic output is off.
"""
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch.nn import functional as F

from ..structures import Boxes, Instances


def sem_seg_postprocess(result: torch.Tensor, img_size: Tuple[int, int], output_height: int,
                        output_width: int) -> torch.Tensor:
    """Crop the padding off (C, H, W) ``result`` to ``img_size`` (h, w), then resize bilinearly
    to (C, oh, ow)."""
    result = result[:, : img_size[0], : img_size[1]]
    if tuple(result.shape[-2:]) == (output_height, output_width):
        # a same-size bilinear resize weighs each pixel by 1 and its neighbour by 0: a no-op
        return result
    return F.interpolate(result[None], size=(output_height, output_width), mode="bilinear",
                         align_corners=False)[0]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """mask_cls (Q, K+1) logits, mask_pred (Q, H, W) logits -> (K, H, W) per-class scores:
    sum over queries of softmax class probability times sigmoid mask probability."""
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def panoptic_keep(mask_cls: torch.Tensor, *, num_classes: int, object_mask_threshold: float) -> torch.Tensor:
    """mask_cls (Q, K+1) -> (Q,) bool: the queries panoptic_inference uses (a class other than
    "no object" with probability > object_mask_threshold). Row-wise, so
    ``panoptic_inference(mask_cls[keep], mask_pred[keep])`` equals the call on all queries."""
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    return labels.ne(num_classes) & (scores > object_mask_threshold)


def panoptic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, *, num_classes: int,
                       thing_ids: Optional[Set[int]], object_mask_threshold: float,
                       overlap_threshold: float) -> Tuple[torch.Tensor, List[Dict]]:
    """mask_cls (Q, K+1), mask_pred (Q, H, W) logits -> (panoptic_seg (H, W) int32, segments_info).

    Queries predicting "no object" or with class score <= object_mask_threshold are dropped.
    Each pixel goes to the query maximising score * mask probability; a query keeps its pixels
    only where its own mask probability is >= 0.5 and only if that leaves at least
    overlap_threshold of its own mask. Stuff segments of one class are merged into one id.
    ``thing_ids``: contiguous class ids that are things (None: every class is a thing).
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = panoptic_keep(mask_cls, num_classes=num_classes, object_mask_threshold=object_mask_threshold)
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = mask_pred[keep].sigmoid()
    h, w = cur_masks.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment_of_class: Dict[int, int] = {}
    segment_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        isthing = thing_ids is None or pred_class in thing_ids
        won = mask_ids == k
        own = cur_masks[k] >= 0.5
        mask = won & own
        mask_area, original_area = int(won.sum()), int(own.sum())
        if mask_area == 0 or original_area == 0 or not bool(mask.any()):
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing:
            if pred_class in stuff_segment_of_class:
                panoptic_seg[mask] = stuff_segment_of_class[pred_class]
                continue
            stuff_segment_of_class[pred_class] = segment_id + 1
        segment_id += 1
        panoptic_seg[mask] = segment_id
        segments_info.append({"id": segment_id, "isthing": bool(isthing), "category_id": pred_class})
    return panoptic_seg, segments_info


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool/0-1 masks -> (N, 4) tight boxes (x0, y0, x1, y1) in pixel-edge
    coordinates; empty masks give all-zero boxes."""
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)
    nonempty = rows.any(1)
    h, w = m.shape[-2:]
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    big = torch.iinfo(torch.int64).max
    y0 = torch.where(rows, ar_h, big).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, big).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes[nonempty] = torch.stack([x0, y0, x1, y1], 1)[nonempty].float()
    return boxes


def instance_candidates(mask_cls: torch.Tensor, *, num_classes: int, topk: int,
                        thing_ids: Optional[Set[int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask_cls (Q, K+1) -> the detections' class probabilities (N,), classes (N,) and query
    indices (N,), N <= topk.

    Every (query, class) pair is a candidate scored by its class probability; the top ``topk``
    pairs are kept (a query may appear with several classes). With ``thing_ids`` given, pairs of
    stuff classes are dropped afterwards.
    """
    q = mask_cls.shape[0]
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(q, 1).flatten(0, 1)
    topk = min(topk, scores.numel())
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(topk, sorted=False)
    labels_per_image = labels[topk_indices]
    query_index = torch.div(topk_indices, num_classes, rounding_mode="floor")
    if thing_ids is not None:
        keep = torch.tensor([int(lab) in thing_ids for lab in labels_per_image.tolist()], dtype=torch.bool,
                            device=mask_cls.device)
        scores_per_image, labels_per_image, query_index = scores_per_image[keep], labels_per_image[keep], query_index[keep]
    return scores_per_image, labels_per_image, query_index


def instances_from_candidates(scores: torch.Tensor, labels: torch.Tensor, mask_pred: torch.Tensor) -> Instances:
    """scores (N,), labels (N,), mask_pred (N, H, W) logits of each detection's query -> Instances.

    Masks are logits > 0; the final score multiplies the class probability by the mean mask
    probability inside the binary mask.
    """
    return instances_from_masks(scores, labels, mask_pred.sigmoid(), (mask_pred > 0).float())


def instances_from_masks(scores: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
                         binary: torch.Tensor) -> Instances:
    """Instances of N detections from class probabilities (N,), labels (N,), mask probabilities
    and 0/1 masks (N, H, W): score = class probability x mean mask probability inside the mask
    (0 for an empty mask), boxes around the masks."""
    mask_scores = (probs.flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    result = Instances(tuple(binary.shape[-2:]))
    result.pred_masks = binary
    result.pred_boxes = Boxes(masks_to_boxes(binary))
    result.scores = scores * mask_scores
    result.pred_classes = labels
    return result


def instance_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, *, num_classes: int, topk: int,
                       thing_ids: Optional[Set[int]] = None) -> Instances:
    """mask_cls (Q, K+1), mask_pred (Q, H, W) logits -> Instances of up to ``topk`` detections
    (:func:`instance_candidates` then :func:`instances_from_candidates`)."""
    scores, labels, query_index = instance_candidates(mask_cls, num_classes=num_classes, topk=topk,
                                                      thing_ids=thing_ids)
    return instances_from_candidates(scores, labels, mask_pred[query_index])
