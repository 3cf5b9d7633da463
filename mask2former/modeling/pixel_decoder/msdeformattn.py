"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over the coarser
backbone levels, then an FPN top-down path to the finest level.

``forward_features(features)`` returns
    mask_features (N, mask_dim, H/4, W/4) — per-pixel embeddings dotted with query embeddings,
    encoder output at the coarsest level (N, conv_dim, H/32, W/32),
    multi_scale_features: 3 maps (N, conv_dim, H/s, W/s), s = 32, 16, 8 (coarsest first).
"""
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...ops import level_shapes_tensor, level_start_tensor
from ...layers import Conv2d, MSDeformAttn, PositionEmbeddingSine, ShapeSpec, c2_xavier_fill, clones, ffn_block
from ...utils.registry import PIXEL_DECODER_REGISTRY
from .fpn import (
    NUM_MULTI_SCALE_FEATURES,
    add_fpn_level,
    fpn_merge,
    pixel_decoder_input_shape,
    sorted_by_stride,
)

# The official decoder fixes the deformable encoder's feed-forward width at 1024.
DEFORMABLE_ENCODER_DIM_FEEDFORWARD = 1024


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The deformable encoder runs in float32 (or float64 when asked), never in half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then FFN.
    Keys: self_attn.*, norm1.*, linear1.*, linear2.*, norm2.*"""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        return self.forward_ffn(self.norm1(src + self.dropout1(attn)))

    def forward_ffn(self, src, linear1=None):
        """The feed-forward block; ``linear1``: a callable used in place of ``self.linear1``."""
        return ffn_block(linear1 or self.linear1, self.linear2, self.norm2, self.dropout2, self.dropout3, F.relu_, src)


class MSDeformAttnEncoder(nn.Module):
    """Keys: layers.{i}.*"""

    def __init__(self, layer: MSDeformAttnEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)

    @staticmethod
    def reference_points(spatial_shapes: List[tuple], device, dtype=torch.float32):
        """Pixel centres of every level, normalised to [0, 1]: (1, S, 1, 2) as (x, y).
        Inputs are never padded inside the encoder, so the point is the same for all levels."""
        points = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
        return torch.cat(points, 0)[None, :, None]

    def forward(self, src, spatial_shapes, level_start_index, shapes_list, pos):
        ref = self.reference_points(shapes_list, src.device)
        ref = ref.expand(src.shape[0], -1, len(shapes_list), -1)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the position encodings and runs the
    deformable encoder. Keys: level_embed (L, C), encoder.layers.*"""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024, dropout=0.1,
                 num_feature_levels=4, enc_n_points=4):
        super().__init__()
        layer = MSDeformAttnEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder = MSDeformAttnEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]):
        """srcs, pos_embeds: lists of (N, C, H_l, W_l). Returns (N, S, C), the (H, W) list and
        level_start_index (L,)."""
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        src_flat = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        # the layers get the (H, W) pairs, not a tensor of them: sizes stay symbolic under torch.export
        memory = self.encoder(src_flat, shapes, None, shapes, pos_flat)
        return memory, shapes, level_start_tensor(level_shapes_tensor(shapes, src_flat.device))


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Keys: input_proj.{i}.{0: conv, 1: GroupNorm} (coarsest level first), transformer.*,
    mask_features, adapter_{i} / layer_{i} for the FPN levels finer than the encoder's."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_dropout: float, transformer_nheads: int,
                 transformer_dim_feedforward: int, transformer_enc_layers: int, conv_dim: int, mask_dim: int,
                 norm: Optional[Union[str, Callable]] = None, transformer_in_features: List[str],
                 common_stride: int, transformer_n_points: int = 4):
        super().__init__()
        shapes = sorted_by_stride(input_shape)
        self.in_features = [k for k, _ in shapes]
        self.feature_channels = [v.channels for _, v in shapes]
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise KeyError(
                f"DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES names {missing}, which are not among the pixel "
                f"decoder inputs {self.in_features} (MODEL.SEM_SEG_HEAD.IN_FEATURES)"
            )
        enc_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in enc_shapes]
        enc_channels = [v.channels for _, v in enc_shapes]
        self.transformer_feature_strides = [v.stride for _, v in enc_shapes]
        self.transformer_num_feature_levels = len(enc_shapes)

        projections = []
        for ch in enc_channels[::-1]:
            conv = nn.Conv2d(ch, conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            projections.append(nn.Sequential(conv, nn.GroupNorm(32, conv_dim)))
        self.input_proj = nn.ModuleList(projections)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, dropout=transformer_dropout, nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward, num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels, enc_n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

        self.common_stride = common_stride
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = max(0, (stride // common_stride).bit_length() - 1)  # log2(stride / common_stride)
        levels = [add_fpn_level(self, idx, ch, conv_dim, norm)
                  for idx, ch in enumerate(self.feature_channels[: self.num_fpn_levels])]
        # coarsest first, as they are used top-down
        self.lateral_convs = [lat for lat, _ in levels][::-1]
        self.output_convs = [out for _, out in levels][::-1]

    @classmethod
    def from_config(cls, cfg, input_shape):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": pixel_decoder_input_shape(cfg, input_shape),
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": DEFORMABLE_ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
        }

    def forward_features(self, features):
        srcs, pos = [], []
        # coarsest level first; the deformable encoder runs in float32 even under autocast
        with torch.autocast(device_type=next(iter(features.values())).device.type, enabled=False):
            for idx, name in enumerate(self.transformer_in_features[::-1]):
                x = _at_least_fp32(features[name])
                srcs.append(self.input_proj[idx](x))
                pos.append(self.pe_layer(x))
            memory, shapes, _ = self.transformer(srcs, pos)
            n = memory.shape[0]
            sizes = [h * w for h, w in shapes]
            outs = [
                z.transpose(1, 2).reshape(n, -1, h, w) for z, (h, w) in zip(memory.split(sizes, dim=1), shapes)
            ]
            for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
                outs.append(self.fpn_merge(idx, _at_least_fp32(features[name]), outs[-1]))
        return self.mask_features(outs[-1]), outs[0], outs[:NUM_MULTI_SCALE_FEATURES]

    def fpn_merge(self, idx: int, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Top-down step ``idx`` (0 = coarsest FPN level): x (N, C_l, H_l, W_l) from the backbone
        and the coarser output ``top`` -> (N, conv_dim, H_l, W_l)."""
        return fpn_merge(self.lateral_convs[idx], self.output_convs[idx], x, top, "bilinear")

    def forward(self, features):
        return self.forward_features(features)
