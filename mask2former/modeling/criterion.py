"""Set criterion of Mask2Former: holds the loss weights and the class weight vector.

``empty_weight`` (K+1,) is part of the official checkpoints: 1 for every class and
NO_OBJECT_WEIGHT for the "no object" class, used by the classification loss.
"""
from typing import Dict

import torch
from torch import nn


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, *, weight_dict: Dict[str, float], eos_coef: float, num_points: int,
                 oversample_ratio: float, importance_sample_ratio: float):
        super().__init__()
        self.num_classes = num_classes
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def losses(self, outputs, batched_inputs, images):
        raise NotImplementedError(
            "training losses (Hungarian matching, point-sampled mask losses) are not implemented yet; "
            "call model.eval() for inference")


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    mf = cfg.MODEL.MASK_FORMER
    weight_dict = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    if mf.DEEP_SUPERVISION:
        # one set of auxiliary losses per earlier prediction (DEC_LAYERS - 1 of them)
        for i in range(mf.DEC_LAYERS - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in list(weight_dict.items())[:3]})
    return SetCriterion(num_classes, weight_dict=weight_dict, eos_coef=mf.NO_OBJECT_WEIGHT,
                        num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
                        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO)
