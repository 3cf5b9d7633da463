"""SeMask's head: Mask2Former's :class:`MaskFormerHead` plus a branch that decodes the backbone's
semantic priors into one per-pixel class map, registered as ``BranchMaskFormerHead``.

The branch (``sem_head``, :class:`SemanticPriorDecoder`, the official ``SemanticHead``) has no
parameters, so the head's keys are MaskFormerHead's (``pixel_decoder.*``, ``predictor.*``).
``forward(features)`` is MaskFormerHead's; the meta architecture calls
:meth:`BranchMaskFormerHead.decode_priors` when it trains the priors.
"""
import math
from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...layers import ShapeSpec
from ...utils.registry import SEM_SEG_HEADS_REGISTRY
from .mask_former_head import MaskFormerHead

__all__ = ["BranchMaskFormerHead", "SemanticPriorDecoder"]


def _upsample(x: torch.Tensor, **size_or_scale) -> torch.Tensor:
    return F.interpolate(x, mode="bilinear", align_corners=True, **size_or_scale)


class SemanticPriorDecoder(nn.Module):
    """Sums the prior logits of every stage at the finest stride, then upsamples the sum by that
    stride to the padded input size. A coarser map (stride s) is first upsampled log2(s / s0)
    times by 2 and then resized to the finest map's size; every resize is bilinear with
    align_corners=True (as the official code).

    forward: {name: (N, K, H/s, W/s)} holding ``names`` -> (N, K, H, W) logits."""

    def __init__(self, names: Sequence[str], strides: Sequence[int]):
        super().__init__()
        order = sorted(range(len(names)), key=lambda i: strides[i])
        self.names = [names[i] for i in order]
        self.strides = [int(strides[i]) for i in order]
        bad = [s for s in self.strides if s < 1 or s & (s - 1) or s % self.strides[0]]
        if not self.names or bad:
            raise ValueError(f"semantic priors need power-of-two strides, each a multiple of the finest; "
                             f"got {dict(zip(names, strides))}")
        self.doublings = [int(math.log2(s // self.strides[0])) for s in self.strides]

    def forward(self, priors: Dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in priors]
        if missing:
            raise KeyError(f"semantic priors {missing} missing: the backbone returned {sorted(priors)}, the head "
                           f"reads MODEL.SEM_SEG_HEAD.IN_FEATURES {self.names}")
        out = priors[self.names[0]]
        for name, doublings in zip(self.names[1:], self.doublings[1:]):
            y = priors[name]
            for _ in range(doublings):
                y = _upsample(y, scale_factor=2)
            out = out + _upsample(y, size=out.shape[-2:])
        h, w = out.shape[-2:]
        return _upsample(out, size=(h * self.strides[0], w * self.strides[0]))


@SEM_SEG_HEADS_REGISTRY.register()
class BranchMaskFormerHead(MaskFormerHead):
    """MaskFormerHead plus ``sem_head`` (:class:`SemanticPriorDecoder` over the head's input
    features, by name and stride)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], **kwargs):
        super().__init__(input_shape, **kwargs)
        self.sem_head = SemanticPriorDecoder(list(input_shape), [v.stride for v in input_shape.values()])

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return MaskFormerHead.from_config(cfg, input_shape)

    def decode_priors(self, priors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's per-stage prior logits -> (N, K, H, W) class logits at the padded input size."""
        return self.sem_head(priors)
