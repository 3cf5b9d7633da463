"""kMaX-DeepLab's auxiliary semantic predictor (training only; built when
MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT > 0, so its keys are in the released checkpoints).

``SemanticPredictor`` (USE_AUX_SEMANTIC_DECODER True): Panoptic-DeepLab's single decoder, ASPP on
the stride-32 backbone feature, fused with projections of the stride-8 and stride-4 features,
then a 5x5 depthwise + 1x1 head: (N, K+1, H/4, W/4) logits. ``light_semantic_predictor`` (False):
one depthwise block and a classifier on the stride-32 feature: (N, K, H/32, W/32).
Keys follow the official model (``_aspp._aspp_conv0``, ``_low_level_projection_os8``, ...).
"""
from typing import Sequence

import torch
from torch import nn
from timm.layers import trunc_normal_tf_

from ...layers import ConvBN
from ..pixel_decoder.kmax_pixel_decoder import resize_aligned

__all__ = ["ASPP", "SemanticPredictor", "light_semantic_predictor"]


def _conv_bn_gelu(cin: int, cout: int, kernel: int = 1, **kw) -> ConvBN:
    return ConvBN(cin, cout, kernel, bias=False, norm=True, act="gelu", **kw)


def _depthwise5(channels: int) -> ConvBN:
    return _conv_bn_gelu(channels, channels, 5, padding=2, groups=channels, conv_init="xavier_uniform")


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, three dilated 3x3 convs and image pooling,
    concatenated and projected: (N, C, H, W) -> (N, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self._aspp_conv0 = _conv_bn_gelu(in_channels, out_channels)
        for i, r in enumerate(rates, start=1):
            setattr(self, f"_aspp_conv{i}", _conv_bn_gelu(in_channels, out_channels, 3, dilation=r, padding=r))
        self._avg_pool = nn.AdaptiveAvgPool2d(1)
        self._aspp_pool = _conv_bn_gelu(in_channels, out_channels)
        self._proj_conv_bn_act = _conv_bn_gelu(5 * out_channels, out_channels)
        self._proj_drop = nn.Dropout(p=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self._aspp_conv0(x), self._aspp_conv1(x), self._aspp_conv2(x), self._aspp_conv3(x),
                    resize_aligned(self._aspp_pool(self._avg_pool(x)), x.shape[-2:], x.shape[-1])]
        return self._proj_drop(self._proj_conv_bn_act(torch.cat(branches, dim=1)))


class SemanticPredictor(nn.Module):
    def __init__(self, in_channels: int, os8_channels: int, os4_channels: int, num_classes: int):
        super().__init__()
        self._aspp = ASPP(in_channels, 256)
        self._low_level_projection_os8 = _conv_bn_gelu(os8_channels, 64)
        self._low_level_fusion_os8_conv0_bn_act = _depthwise5(256 + 64)
        self._low_level_fusion_os8_conv1_bn_act = _conv_bn_gelu(256 + 64, 256)
        self._low_level_projection_os4 = _conv_bn_gelu(os4_channels, 32)
        self._low_level_fusion_os4_conv0_bn_act = _depthwise5(256 + 32)
        self._low_level_fusion_os4_conv1_bn_act = _conv_bn_gelu(256 + 32, 256)
        self.conv_block_0 = _depthwise5(256)
        self.conv_block_1 = _conv_bn_gelu(256, 256)
        self.final_conv = ConvBN(256, num_classes, 1)
        trunc_normal_tf_(self.final_conv.conv.weight, std=0.01)

    def forward(self, x: torch.Tensor, low_features_os8: torch.Tensor, low_features_os4: torch.Tensor):
        x = self._aspp(x)
        width = x.shape[-1]  # the official code keeps the stride-32 width's parity for both resizes
        os8 = self._low_level_projection_os8(low_features_os8)
        x = torch.cat([resize_aligned(x, os8.shape[-2:], width), os8], dim=1)
        x = self._low_level_fusion_os8_conv1_bn_act(self._low_level_fusion_os8_conv0_bn_act(x))
        os4 = self._low_level_projection_os4(low_features_os4)
        x = torch.cat([resize_aligned(x, os4.shape[-2:], width), os4], dim=1)
        x = self._low_level_fusion_os4_conv1_bn_act(self._low_level_fusion_os4_conv0_bn_act(x))
        return self.final_conv(self.conv_block_1(self.conv_block_0(x)))


def light_semantic_predictor(in_channels: int, num_classes: int) -> nn.Sequential:
    """Keys ``0`` (5x5 depthwise), ``1`` (1x1 to 256), ``2`` (classifier, K outputs, no void)."""
    head = nn.Sequential(_depthwise5(in_channels), _conv_bn_gelu(in_channels, 256), ConvBN(256, num_classes, 1))
    trunc_normal_tf_(head[2].conv.weight, std=0.01)
    return head
