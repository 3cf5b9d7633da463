"""kMaX-DeepLab's post-processing (MaX-DeepLab's, from DeepLab2): masks are a softmax over the
queries, not per-query sigmoids as in Mask2Former (:mod:`.postprocessing`).

Shapes: Q queries, K classes (class logits have K+1, the last is void), (H, W) the output size.
``mask_probs`` = softmax of the mask logits over the queries, (Q, H, W), shared by the three tasks.
"""
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch.nn import functional as F

from ..structures import Instances
from .postprocessing import instance_candidates, instances_from_masks

__all__ = ["kmax_semantic_inference", "kmax_panoptic_inference", "kmax_instance_inference"]


def kmax_semantic_inference(mask_cls: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """(K, H, W): sum over queries of the class probability (void dropped) times the mask
    probability."""
    return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_probs)


def kmax_panoptic_inference(mask_cls: torch.Tensor, mask_probs: torch.Tensor, *, thing_ids: Optional[Set[int]],
                            pixel_confidence_threshold: float, class_threshold_thing: float,
                            class_threshold_stuff: float, overlap_threshold: float, reorder_class_weight: float,
                            reorder_mask_weight: float) -> Tuple[torch.Tensor, List[Dict]]:
    """-> (panoptic_seg int32 (H, W), segments_info [{"id", "isthing", "category_id"}]).

    A query's mask is where its probability exceeds ``pixel_confidence_threshold``; its class is
    its most probable non-void class. Queries are placed in decreasing order of
    class_score ** reorder_class_weight * mean_mask_probability ** reorder_mask_weight; a query is
    kept if its class score exceeds the thing / stuff threshold and the pixels still free are more
    than ``overlap_threshold`` of its mask. Stuff of one class is merged into its first segment.
    ``thing_ids``: contiguous ids of thing classes (None: every class is a thing).
    """
    cls_scores, cls_labels = F.softmax(mask_cls, dim=-1)[..., :-1].max(-1)
    binary = mask_probs > pixel_confidence_threshold
    binary_flat = binary.flatten(1).float()
    pixels = binary_flat.sum(1)
    mask_scores = (mask_probs.flatten(1) * binary_flat).sum(1) / pixels.clamp(min=1.0)
    order = torch.argsort(cls_scores ** reorder_class_weight * mask_scores ** reorder_mask_weight, descending=True)

    panoptic_seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32, device=mask_probs.device)
    segments_info: List[Dict] = []
    stuff_segment_of_class: Dict[int, int] = {}
    # the overlap bound in float32, as the official tensors compute it
    scores, labels, bounds = cls_scores.tolist(), cls_labels.tolist(), (pixels * overlap_threshold).tolist()
    for idx in order.tolist():
        label = int(labels[idx])
        is_thing = thing_ids is None or label in thing_ids
        if not scores[idx] > (class_threshold_thing if is_thing else class_threshold_stuff):
            continue
        free = binary[idx] & (panoptic_seg == 0)
        if not int(free.sum()) > bounds[idx]:
            continue
        if not is_thing:
            if label in stuff_segment_of_class:
                panoptic_seg[free] = stuff_segment_of_class[label]
                continue
            stuff_segment_of_class[label] = len(segments_info) + 1
        panoptic_seg[free] = len(segments_info) + 1
        segments_info.append({"id": len(segments_info) + 1, "isthing": bool(is_thing), "category_id": label})
    return panoptic_seg, segments_info


def kmax_instance_inference(mask_cls: torch.Tensor, mask_probs: torch.Tensor, *, num_classes: int, topk: int,
                            pixel_confidence_threshold: float, thing_ids: Optional[Set[int]] = None) -> Instances:
    """Instances of the top ``topk`` (query, class) pairs by class probability (then only thing
    classes when ``thing_ids`` is given): masks = mask probability > threshold, score = class
    probability x mean mask probability inside the mask (0 for an empty mask)."""
    scores, labels, query_index = instance_candidates(mask_cls, num_classes=num_classes, topk=topk,
                                                      thing_ids=thing_ids)
    probs = mask_probs[query_index]
    return instances_from_masks(scores, labels, probs, (probs > pixel_confidence_threshold).float())
