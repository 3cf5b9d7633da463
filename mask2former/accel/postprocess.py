"""Panoptic and instance post-processing that upsamples only the masks it uses.

Panoptic inference keeps the queries whose class score passes OBJECT_MASK_THRESHOLD, instance
inference the top-k (query, class) pairs; the plain path upsamples every query's mask to the
padded and then the output size first. Interpolation is per channel, so upsampling only the
queries those steps use gives exactly the plain results. (Semantic output needs every mask, so
with SEMANTIC_ON the plain path runs.)
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..modeling import postprocessing as post
from ..modeling.meta_arch.mask_former import MaskFormer
from ..modeling.meta_arch.semask_mask_former import SeMaskMaskFormer
from .core import accelerates, inference_active

__all__ = ["SelectedPostprocessing", "FastMaskFormer", "FastSeMaskMaskFormer"]


class SelectedPostprocessing:
    """Mixin for a MaskFormer-like meta architecture (its ``postprocess`` and attributes)."""

    def postprocess(self, outputs, batched_inputs, image_sizes, padded_size):
        if self.semantic_on or not (self.panoptic_on or self.instance_on) or not inference_active(self):
            return super().postprocess(outputs, batched_inputs, image_sizes, padded_size)
        return [self._selected(mask_cls, masks, inp, image_size, padded_size)
                for mask_cls, masks, inp, image_size in zip(outputs["pred_logits"], outputs["pred_masks"],
                                                            batched_inputs, image_sizes)]

    def _selected(self, mask_cls, masks, inp, image_size, padded_size):
        """One image: mask_cls (Q, K+1), masks (Q, H/4, W/4) -> its result dict."""
        num_classes = self.sem_seg_head.num_classes
        height = int(inp.get("height", image_size[0]))
        width = int(inp.get("width", image_size[1]))
        mask_cls = mask_cls.to(masks)  # as the plain path does before inference
        used = []
        if self.panoptic_on:
            keep = post.panoptic_keep(mask_cls, num_classes=num_classes,
                                      object_mask_threshold=self.object_mask_threshold).nonzero().flatten()
            used.append(keep)
        if self.instance_on:
            scores, labels, query_index = post.instance_candidates(
                mask_cls, num_classes=num_classes, topk=self.test_topk_per_image,
                thing_ids=self.thing_ids if self.panoptic_on else None)
            used.append(query_index)
        needed = torch.cat(used).unique()  # sorted
        if needed.numel():
            selected = F.interpolate(masks[needed][None], size=padded_size, mode="bilinear", align_corners=False)[0]
            selected = post.sem_seg_postprocess(selected, image_size, height, width)
        else:
            selected = masks.new_zeros((0, height, width))
        row = torch.full((masks.shape[0],), -1, dtype=torch.long, device=masks.device)
        row[needed] = torch.arange(needed.numel(), device=masks.device)
        res = {}
        if self.panoptic_on:
            res["panoptic_seg"] = post.panoptic_inference(
                mask_cls[keep], selected[row[keep]], num_classes=num_classes, thing_ids=self.thing_ids,
                object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold)
        if self.instance_on:
            res["instances"] = post.instances_from_candidates(scores, labels, selected[row[query_index]])
        return res


@accelerates(MaskFormer)
class FastMaskFormer(SelectedPostprocessing, MaskFormer):
    pass


@accelerates(SeMaskMaskFormer)
class FastSeMaskMaskFormer(SelectedPostprocessing, SeMaskMaskFormer):
    pass
