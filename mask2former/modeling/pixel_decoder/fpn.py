"""FPN-style pixel decoders of MaskFormer: BasePixelDecoder and TransformerEncoderPixelDecoder.

``forward_features(features)`` returns
    mask_features (N, mask_dim, H/4, W/4),
    transformer_encoder_features (N, conv_dim, H/32, W/32) or None,
    multi_scale_features: list of 3 maps, coarsest first (N, conv_dim, H/s, W/s).
"""
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...layers import Conv2d, PositionEmbeddingSine, ShapeSpec, TransformerEncoderLayer, c2_xavier_fill, clones, get_norm
from ...utils.registry import PIXEL_DECODER_REGISTRY

NUM_MULTI_SCALE_FEATURES = 3  # the transformer decoder always reads three scales


def fpn_output_conv(in_channels: int, conv_dim: int, norm) -> Conv2d:
    """3x3 conv + norm + ReLU; bias only when there is no norm."""
    conv = Conv2d(in_channels, conv_dim, kernel_size=3, padding=1, bias=norm == "",
                  norm=get_norm(norm, conv_dim), activation=F.relu_)
    c2_xavier_fill(conv)
    return conv


def fpn_lateral_conv(in_channels: int, conv_dim: int, norm) -> Conv2d:
    conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=norm == "", norm=get_norm(norm, conv_dim))
    c2_xavier_fill(conv)
    return conv


def add_fpn_level(module: nn.Module, idx: int, in_channels: int, conv_dim: int, norm):
    """Create and register ``adapter_{idx+1}`` (1x1 lateral) and ``layer_{idx+1}`` (3x3 output)."""
    lateral = fpn_lateral_conv(in_channels, conv_dim, norm)
    output = fpn_output_conv(conv_dim, conv_dim, norm)
    module.add_module(f"adapter_{idx + 1}", lateral)
    module.add_module(f"layer_{idx + 1}", output)
    return lateral, output


def fpn_merge(lateral: Conv2d, output: Conv2d, x: torch.Tensor, top: torch.Tensor, mode: str) -> torch.Tensor:
    """Top-down step: output(lateral(x) + ``mode``-upsampled ``top``) at x's size."""
    lat = lateral(x)
    if mode == "nearest":
        up = F.interpolate(top, size=lat.shape[-2:], mode="nearest")
    else:
        up = F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False)
    return output(lat + up)


def sorted_by_stride(input_shape: Dict[str, ShapeSpec]):
    return sorted(input_shape.items(), key=lambda kv: kv[1].stride)


def pixel_decoder_input_shape(cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, ShapeSpec]:
    wanted = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
    missing = [k for k in wanted if k not in input_shape]
    if missing:
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not output "
            f"(it outputs {sorted(input_shape)})"
        )
    return {k: v for k, v in input_shape.items() if k in wanted}


@PIXEL_DECODER_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """Keys: adapter_{i} (1x1 laterals), layer_{i} (3x3 outputs), mask_features; i = 1 for the
    finest level; the coarsest level has only layer_{n}."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int,
                 norm: Optional[Union[str, Callable]] = None):
        super().__init__()
        shapes = sorted_by_stride(input_shape)
        self.in_features = [k for k, _ in shapes]
        channels = [v.channels for _, v in shapes]
        n = len(channels)
        lateral_convs, output_convs = [], []
        for idx, ch in enumerate(channels):
            if idx == n - 1:  # the coarsest level has no lateral
                lateral, output = None, fpn_output_conv(ch, conv_dim, norm)
                self.add_module(f"layer_{idx + 1}", output)
            else:
                lateral, output = add_fpn_level(self, idx, ch, conv_dim, norm)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # coarsest first, as they are used top-down
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_fill(self.mask_features)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "input_shape": pixel_decoder_input_shape(cfg, input_shape),
            "conv_dim": cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
        }

    def encode_coarsest(self, x):
        """Returns (output of the coarsest level, transformer-encoder features or None)."""
        return self.output_convs[0](x), None

    def forward_features(self, features):
        multi_scale = []
        encoder_features = None
        y = None
        for idx, name in enumerate(self.in_features[::-1]):
            x = features[name]
            if idx == 0:
                y, encoder_features = self.encode_coarsest(x)
            else:
                y = fpn_merge(self.lateral_convs[idx], self.output_convs[idx], x, y, "nearest")
            if len(multi_scale) < NUM_MULTI_SCALE_FEATURES:
                multi_scale.append(y)
        return self.mask_features(y), encoder_features, multi_scale

    def forward(self, features):
        return self.forward_features(features)


class _TransformerEncoder(nn.Module):
    """Stack of DETR encoder layers over a flattened feature map (keys ``layers.{i}.*``)."""

    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout, normalize_before):
        super().__init__()
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, "relu", normalize_before)
        self.layers = clones(layer, num_layers)
        self.norm = nn.LayerNorm(d_model) if normalize_before else None
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, pos):
        """src, pos: (N, C, H, W) -> (N, C, H, W)."""
        n, c, h, w = src.shape
        x = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        for layer in self.layers:
            x = layer(x, pos=pos)
        if self.norm is not None:
            x = self.norm(x)
        return x.permute(1, 2, 0).view(n, c, h, w)


@PIXEL_DECODER_REGISTRY.register()
class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """BasePixelDecoder whose coarsest level first goes through a transformer encoder.
    Extra keys: input_proj, transformer.encoder.layers.*"""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_dropout: float, transformer_nheads: int,
                 transformer_dim_feedforward: int, transformer_enc_layers: int, transformer_pre_norm: bool,
                 conv_dim: int, mask_dim: int, norm=None):
        super().__init__(input_shape, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        coarsest_channels = sorted_by_stride(input_shape)[-1][1].channels
        self.input_proj = Conv2d(coarsest_channels, conv_dim, kernel_size=1)
        c2_xavier_fill(self.input_proj)
        self.transformer = nn.Module()
        self.transformer.encoder = _TransformerEncoder(conv_dim, transformer_nheads, transformer_enc_layers,
                                                       transformer_dim_feedforward, transformer_dropout,
                                                       transformer_pre_norm)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        # the coarsest output conv now reads conv_dim channels
        out = fpn_output_conv(conv_dim, conv_dim, norm)
        self.add_module(f"layer_{len(self.in_features)}", out)
        self.output_convs[0] = out

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = BasePixelDecoder.from_config(cfg, input_shape)
        ret.update(
            transformer_dropout=cfg.MODEL.MASK_FORMER.DROPOUT,
            transformer_nheads=cfg.MODEL.MASK_FORMER.NHEADS,
            transformer_dim_feedforward=cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD,
            transformer_enc_layers=cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS,
            transformer_pre_norm=cfg.MODEL.MASK_FORMER.PRE_NORM,
        )
        return ret

    def encode_coarsest(self, x):
        enc = self.transformer.encoder(self.input_proj(x), self.pe_layer(x))
        return self.output_convs[0](enc), enc
