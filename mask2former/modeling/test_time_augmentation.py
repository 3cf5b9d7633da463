"""Test-time augmentation (multi-scale + horizontal flip) around a MaskFormer model.

    tta = MaskFormerWithTTA.from_config(cfg, model)     # TEST.AUG.MIN_SIZES / MAX_SIZE / FLIP
    outputs = tta([{"image": chw_original_size, "height": H, "width": W}, ...])

Views, as Detectron2's ``DatasetMapperTTA``: the image is brought back to ``(height, width)`` when
it is not already that size, then for each short side in ``MIN_SIZES`` it is resized
(``ResizeShortestEdge(min_size, MAX_SIZE)``, bilinear) and, with ``FLIP``, also mirrored
left-right. Each view goes through the backbone and head once (views of one image with the same
padded size are batched together) and its predictions are brought to ``(height, width)`` and
un-flipped. The outputs are then combined:

* ``sem_seg``: the mean of the per-view (K, H, W) semantic probabilities, exactly what the official
  ``SemanticSegmentorWithTTA`` computes.
* ``panoptic_seg`` and ``instances`` (not defined by the official code): queries are learned
  embeddings, so query ``q`` denotes the same slot in every view. The per-query class logits
  (Q, K+1) and mask logits (Q, H, W, resized to the output size and un-flipped) are averaged over
  the views, and the model's ordinary panoptic / instance post-processing runs on the averages.
  Averaging logits rather than probabilities leaves that post-processing unchanged.

With one view (a single scale equal to the plain test size, no flip) every output equals plain
inference: the mean of one tensor is the tensor itself.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.transforms import resize_image, resize_shortest_edge
from .meta_arch.mask_former import pad_images

__all__ = ["MaskFormerWithTTA", "augmented_sizes"]


def augmented_sizes(h: int, w: int, min_sizes: Sequence[int], max_size: int) -> List[Tuple[int, int]]:
    """The (newh, neww) of each scale of an ``h x w`` image (``max_size`` <= 0: no cap)."""
    return [resize_shortest_edge(h, w, int(s), max_size) for s in min_sizes]


def _resize_chw(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) uint8 tensor with the plain test-time resize, so that the
    original scale gives the very same pixels."""
    if tuple(image.shape[-2:]) == (h, w):
        return image
    out = resize_image(image.permute(1, 2, 0).numpy(), h, w)
    return torch.as_tensor(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _as_uint8(i: int, image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise TypeError(f"batched_inputs[{i}]['image'] must be a (C, H, W) tensor; got "
                        f"{getattr(image, 'shape', type(image).__name__)}")
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    whole = image.is_floating_point() and torch.equal(image, image.round())
    if not whole or (image.numel() and (float(image.min()) < 0 or float(image.max()) > 255)):
        raise ValueError(f"batched_inputs[{i}]['image']: test-time augmentation resizes 8-bit images; expected "
                         f"uint8 or whole-number float values in 0..255, got {image.dtype}")
    return image.to(torch.uint8)


class MaskFormerWithTTA(nn.Module):
    """Wraps an eval-mode :class:`~mask2former.modeling.meta_arch.MaskFormer`; see the module doc.

    Args:
        model: the MaskFormer model (its ``normalize`` and ``predict_padded``, the ``*_on`` flags
            and post-processing thresholds are used).
        min_sizes: short sides of the scales (``TEST.AUG.MIN_SIZES``).
        max_size: cap on the long side (``TEST.AUG.MAX_SIZE``; <= 0: none).
        flip: also run each scale mirrored left-right (``TEST.AUG.FLIP``).
    """

    def __init__(self, model: nn.Module, *, min_sizes: Sequence[int], max_size: int, flip: bool):
        super().__init__()
        min_sizes = [int(s) for s in min_sizes]
        if not min_sizes or any(s <= 0 for s in min_sizes):
            raise ValueError(f"TEST.AUG.MIN_SIZES must be a non-empty list of positive sizes; got {min_sizes}")
        refusal = getattr(model, "NO_TTA_REASON", None)
        if refusal:
            raise ValueError(f"TEST.AUG.ENABLED is True but {refusal}; set TEST.AUG.ENABLED False")
        for attr in ("predict_padded", "sem_seg_head", "normalize", "semantic_on", "panoptic_on", "instance_on"):
            if not hasattr(model, attr):
                raise TypeError(f"test-time augmentation needs a MaskFormer model; {type(model).__name__} "
                                f"has no {attr!r}")
        self.model = model
        self.min_sizes = min_sizes
        self.max_size = int(max_size)
        self.flip = bool(flip)

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> "MaskFormerWithTTA":
        aug = cfg.TEST.AUG
        return cls(model, min_sizes=list(aug.MIN_SIZES), max_size=aug.MAX_SIZE, flip=aug.FLIP)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def views(self, image: torch.Tensor, height: int, width: int) -> List[Tuple[torch.Tensor, bool]]:
        """The (C, h, w) uint8 view images of one (C, H, W) uint8 image and whether each is flipped."""
        image = _resize_chw(image, height, width)
        out = []
        for h, w in augmented_sizes(height, width, self.min_sizes, self.max_size):
            resized = _resize_chw(image, h, w)
            out.append((resized, False))
            if self.flip:
                out.append((resized.flip(-1), True))
        return out

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Same inputs and outputs as the model in eval mode, except that ``image`` is the whole
        image (any size; it is resized to ``height`` x ``width`` first). Images are processed one
        after the other, so that only one image's sums are held at a time."""
        if self.model.training:
            raise RuntimeError("test-time augmentation is for inference: call model.eval() first")
        if not isinstance(batched_inputs, (list, tuple)) or not batched_inputs:
            raise TypeError("the model takes a non-empty list of dicts, one per image, each with an 'image' key")
        for i, x in enumerate(batched_inputs):
            if not isinstance(x, dict) or "image" not in x:
                raise TypeError(f"batched_inputs[{i}] must be a dict with an 'image' tensor")
        return [self._inference_one(i, x) for i, x in enumerate(batched_inputs)]

    def _inference_one(self, i: int, x: Dict) -> Dict:
        image = _as_uint8(i, x["image"])
        height = int(x.get("height", image.shape[-2]))
        width = int(x.get("width", image.shape[-1]))
        views = self.views(image, height, width)
        # views of the same padded size (e.g. a scale and its flip) share one forward pass
        groups: Dict[Tuple[int, int], List[int]] = {}
        for k, (view, _) in enumerate(views):
            groups.setdefault(self.model._padded_size(view), []).append(k)

        sums: Dict[str, torch.Tensor] = {}
        for members in groups.values():
            images = self.model.normalize([{"image": views[k][0]} for k in members])
            batch, sizes = pad_images(images, self.model.size_divisibility)
            outputs = self.model.predict_padded(batch)
            masks = F.interpolate(outputs["pred_masks"], size=tuple(batch.shape[-2:]), mode="bilinear",
                                  align_corners=False)
            for j, k in enumerate(members):
                flipped = views[k][1]
                per_view = self._view_predictions(outputs["pred_logits"][j], masks[j], sizes[j], height, width)
                for key, t in per_view.items():
                    if flipped and t.dim() == 3:  # (C, H, W) maps are mirrored back; class logits are not
                        t = t.flip(-1)
                    sums[key] = t if key not in sums else sums[key] + t
        return self._combine({key: t / len(views) for key, t in sums.items()})

    def _view_predictions(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor, image_size: Tuple[int, int],
                          height: int, width: int) -> Dict[str, torch.Tensor]:
        """One view's ``sem_seg`` (K, height, width) probabilities and/or its query ``mask_cls``
        (Q, K+1) and ``mask_pred`` (Q, height, width) logits, following the model's own order of
        resizing and semantic inference."""
        mask_cls, mask_pred, out = self.model.resize_and_semantic(mask_cls, mask_pred, image_size, height, width)
        if self.model.panoptic_on or self.model.instance_on:
            out["mask_cls"] = mask_cls
            out["mask_pred"] = mask_pred
        return out

    def _combine(self, mean: Dict[str, torch.Tensor]) -> Dict:
        res = {"sem_seg": mean["sem_seg"]} if "sem_seg" in mean else {}
        if "mask_cls" in mean:
            res.update(self.model.segments_inference(mean["mask_cls"], mean["mask_pred"]))
        return res


def build_tta_model(cfg, model: nn.Module) -> Optional[MaskFormerWithTTA]:
    """The TTA wrapper of ``model`` when ``cfg.TEST.AUG.ENABLED``, else None."""
    return MaskFormerWithTTA.from_config(cfg, model) if cfg.TEST.AUG.ENABLED else None
