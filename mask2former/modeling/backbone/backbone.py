"""Backbone base class: a module returning a dict of named multi-scale features."""
from typing import Dict

from torch import nn

from ...layers import ShapeSpec


class Backbone(nn.Module):
    """Subclasses set ``_out_features``, ``_out_feature_channels`` and ``_out_feature_strides``
    and return ``{name: (N, C, H, W) tensor}`` from ``forward``."""

    @property
    def size_divisibility(self) -> int:
        """Input sizes must be a multiple of this (0: no constraint)."""
        return 0

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }
