"""SeMask's meta architecture (``SeMaskMaskFormer``): Mask2Former's :class:`MaskFormer` whose
backbone also returns semantic priors (:class:`D2SeMaskSwinTransformer`), trained with one more
loss, ``loss_cate`` (weight MODEL.MASK_FORMER.CATE_WEIGHT): the per-pixel cross-entropy of the
priors decoded by the head's branch (:class:`BranchMaskFormerHead`) against the samples'
``sem_seg`` label maps. Keys: MaskFormer's (backbone.*, sem_seg_head.*, criterion.empty_weight).

Inference is MaskFormer's: the priors shape the backbone features but are not returned (the
official model decodes them at test time too and drops them).
Unlike the official criterion, no ``loss_cate_{i}`` entries are added for the decoder's auxiliary
layers: the official code sets them to a constant 0.
"""
from typing import Dict, List

import torch

from ...utils.registry import META_ARCH_REGISTRY
from ..criterion import semantic_prior_loss
from .mask_former import MaskFormer

__all__ = ["SeMaskMaskFormer"]


@META_ARCH_REGISTRY.register()
class SeMaskMaskFormer(MaskFormer):
    """MaskFormer + SeMask's prior loss. Training samples need ``"sem_seg"`` (int64 (H, W) label
    maps at the image size, MODEL.SEM_SEG_HEAD.IGNORE_VALUE where unlabelled), which the semantic and
    panoptic dataset mappers provide."""

    @classmethod
    def from_config(cls, cfg, backbone=None, sem_seg_head=None):
        ret = super().from_config(cfg, backbone=backbone, sem_seg_head=sem_seg_head)
        backbone, head = ret["backbone"], ret["sem_seg_head"]
        if not callable(getattr(backbone, "forward_with_priors", None)):
            raise ValueError(f"MODEL.META_ARCHITECTURE SeMaskMaskFormer needs a backbone that returns semantic priors "
                             f"(MODEL.BACKBONE.NAME 'D2SeMaskSwinTransformer'); got {cfg.MODEL.BACKBONE.NAME!r}")
        if not callable(getattr(head, "decode_priors", None)):
            raise ValueError("MODEL.META_ARCHITECTURE SeMaskMaskFormer needs MODEL.SEM_SEG_HEAD.NAME "
                             f"'BranchMaskFormerHead' (decodes the priors); got {cfg.MODEL.SEM_SEG_HEAD.NAME!r}")
        if getattr(backbone, "num_classes", head.num_classes) != head.num_classes:
            raise ValueError(f"the backbone's semantic priors have {backbone.num_classes} classes but the head predicts "
                             f"{head.num_classes} (MODEL.SEM_SEG_HEAD.NUM_CLASSES)")
        ret["criterion"].weight_dict["loss_cate"] = cfg.MODEL.MASK_FORMER.CATE_WEIGHT
        return ret

    def compute_losses(self, images: torch.Tensor, targets: List[Dict], batched_inputs: List[Dict]) -> Dict:
        labels = []
        for i, x in enumerate(batched_inputs):
            if "sem_seg" not in x:
                raise ValueError(
                    f"training mode: batched_inputs[{i}] has no 'sem_seg'; SeMaskMaskFormer trains its semantic priors on "
                    "per-pixel labels (int64 (H, W)): use a mapper that returns them (INPUT.DATASET_MAPPER_NAME "
                    "'mask_former_semantic', or a panoptic mapper on a dataset with sem_seg_file_name)")
            labels.append(torch.as_tensor(x["sem_seg"]))
        features, priors = self.backbone.forward_with_priors(images)
        losses = self.criterion(self.head_outputs(features, targets), targets)
        logits = self.sem_seg_head.decode_priors(priors)
        losses["loss_cate"] = semantic_prior_loss(logits, labels, self.sem_seg_head.ignore_value)
        return losses
