"""kMaX-DeepLab's pixel decoder (``kMaXPixelDecoder``): from the coarsest backbone feature up,
one block group per stage (axial-attention blocks at strides 32 and 16, bottleneck blocks below),
each stage's output resized and added to the next finer backbone feature.

Inputs: MODEL.KMAX_DEEPLAB.PIXEL_DEC.IN_FEATURES, ordered by decreasing stride (stage 0 = res5).
``forward_features`` returns
    panoptic_features: the last stage's output (N, 4 * DEC_CHANNELS[-1], H/4, W/4) for ResNet-50,
    semantic_features: [backbone features of stages 0, 2, 3] (for the auxiliary semantic head),
    multi_scale_features: the outputs of stages 0..2 (strides 32, 16, 8), (N, 4 * DEC_CHANNELS[i], ...).

Axial attention attends along one image axis with relative-position embeddings; their tables are
built for one length per stage, (IMAGE_SIZE // stride) + (IMAGE_SIZE % 2) along each axis, so
inputs must be padded to INPUT.IMAGE_SIZE. Keys follow the official model (``_in_norms``,
``_stages.<i>._blocks.<j>``, ``_resized_fuses``).
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from timm.layers import DropPath, trunc_normal_tf_

from ...config.config import image_size_hw
from ...config.configurable import configurable
from ...layers import ConvBN, LayerNorm2d, ShapeSpec, tf_batch_norm
from ...utils.registry import PIXEL_DECODER_REGISTRY

__all__ = ["RelativePositionalEncoding", "AxialAttention", "AxialAttention2D", "AxialBlock", "BlockGroup",
           "ResizedFuse", "kMaXPixelDecoder", "axial_lengths"]

# Relative positions span -(MAX_SPAN - 1) .. MAX_SPAN - 1: tables of 2 * MAX_SPAN - 1 rows.
MAX_SPAN = 255
LAYER_TYPES = ("axial", "bottleneck")


def axial_lengths(image_size: Sequence[int], num_stages: int) -> List[Tuple[int, int]]:
    """(height, width) of the axial-attention tables of stages 0.. (strides 32, 16, 8, ...)."""
    h, w = image_size
    return [(h // (32 >> i) + h % 2, w // (32 >> i) + w % 2) for i in range(num_stages)]


class RelativePositionalEncoding(nn.Module):
    """A learned embedding per relative offset; ``forward()`` -> (length, length, depth), entry
    [q, k] the embedding of offset k - q."""

    def __init__(self, length: int, depth: int):
        super().__init__()
        if length > MAX_SPAN:
            raise ValueError(f"axial attention over {length} positions exceeds the {MAX_SPAN} of its "
                             "relative-position tables (INPUT.IMAGE_SIZE too large)")
        self._embeddings = nn.Embedding(2 * MAX_SPAN - 1, depth)
        trunc_normal_tf_(self._embeddings.weight, std=1.0)
        self.length, self.depth = length, depth
        offsets = torch.arange(length, device="cpu")
        self.register_buffer("index", (offsets[None, :] - offsets[:, None] + MAX_SPAN - 1).reshape(-1),
                             persistent=False)

    def forward(self) -> torch.Tensor:
        return self._embeddings.weight[self.index].reshape(self.length, self.length, self.depth)


class AxialAttention(nn.Module):
    """Multi-head attention along the last axis of (N, C, L) with relative positions in queries,
    keys and values, each product batch-normalised; returns (N, value_depth, L)."""

    def __init__(self, in_planes: int, length: int, key_depth: int, value_depth: int, num_heads: int = 8):
        super().__init__()
        if key_depth % num_heads or value_depth % num_heads:
            raise ValueError(f"axial attention depths {key_depth}, {value_depth} must be multiples of {num_heads} heads")
        self.length, self.num_heads = length, num_heads
        self.key_depth, self.value_depth = key_depth, value_depth
        qkv = 2 * key_depth + value_depth
        self.qkv_transform = ConvBN(in_planes, qkv, 1, bias=False, conv_type="1d")
        trunc_normal_tf_(self.qkv_transform.conv.weight, std=in_planes ** -0.5)
        self._query_rpe = RelativePositionalEncoding(length, key_depth // num_heads)
        self._key_rpe = RelativePositionalEncoding(length, key_depth // num_heads)
        self._value_rpe = RelativePositionalEncoding(length, value_depth // num_heads)
        self._batch_norm_qkv = tf_batch_norm(qkv)
        self._batch_norm_similarity = tf_batch_norm(3 * num_heads)
        self._batch_norm_retrieved_output = tf_batch_norm(2 * value_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, length = x.shape
        if length != self.length:
            raise ValueError(f"kMaX axial attention was built for {self.length} positions (from INPUT.IMAGE_SIZE) "
                             f"but got a feature of {length}: inputs must be padded to INPUT.IMAGE_SIZE")
        h = self.num_heads
        qkv = self._batch_norm_qkv(self.qkv_transform(x))
        q, k, v = torch.split(qkv, [self.key_depth, self.key_depth, self.value_depth], dim=1)
        q, k, v = (t.reshape(n, h, -1, length) for t in (q, k, v))
        similarity = torch.cat([torch.einsum("bhdl,bhdm->bhlm", q, k),
                                torch.einsum("bhdl,lmd->bhlm", q, self._query_rpe()),
                                torch.einsum("bhdm,lmd->bhlm", k, self._key_rpe())], dim=1)
        similarity = self._batch_norm_similarity(similarity).reshape(n, 3, h, length, length).sum(1)
        weights = F.softmax(similarity.float(), dim=-1)  # in float32 under AMP too
        retrieved = torch.cat([torch.einsum("bhlm,bhdm->bhdl", weights, v),
                               torch.einsum("bhlm,lmd->bhdl", weights, self._value_rpe())], dim=1)
        retrieved = self._batch_norm_retrieved_output(retrieved.reshape(n, 2 * self.value_depth, length))
        return retrieved.reshape(n, 2, self.value_depth, length).sum(1)


class AxialAttention2D(nn.Module):
    """Height-axis then width-axis attention: (N, C, H, W) -> (N, 2 * filters, H, W)."""

    def __init__(self, in_planes: int, lengths: Tuple[int, int], filters: int, num_heads: int = 8):
        super().__init__()
        self.value_depth = 2 * filters
        self._height_axis = AxialAttention(in_planes, lengths[0], filters, self.value_depth, num_heads)
        self._width_axis = AxialAttention(self.value_depth, lengths[1], filters, self.value_depth, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        d = self.value_depth
        x = self._height_axis(x.permute(0, 3, 1, 2).reshape(n * w, c, h))  # columns: (N W, C, H)
        x = x.reshape(n, w, d, h).permute(0, 3, 2, 1).reshape(n * h, d, w)  # rows: (N H, D, W)
        x = self._width_axis(x)
        return x.reshape(n, h, d, w).permute(0, 2, 1, 3).contiguous()


class AxialBlock(nn.Module):
    """GELU, then 1x1 conv -> (axial attention + GELU | 3x3 conv) -> 1x1 conv, plus a shortcut
    (1x1 conv when the width changes): (N, inplanes, H, W) -> (N, filters[2], H, W)."""

    def __init__(self, inplanes: int, filters: Sequence[int], block_type: str, lengths: Tuple[int, int],
                 drop_path_prob: float = 0.0):
        super().__init__()
        self._block_type = block_type
        self._conv1_bn_act = ConvBN(inplanes, filters[0], 1, bias=False, norm=True, act="gelu")
        if block_type == "axial":
            self._attention = AxialAttention2D(filters[0], lengths, filters[1])
            middle = 2 * filters[1]
        else:
            self._conv2_bn_act = ConvBN(filters[0], filters[1], 3, padding=1, bias=False, norm=True, act="gelu")
            middle = filters[1]
        self._conv3_bn = ConvBN(middle, filters[2], 1, bias=False, norm=True, norm_init=0.0)
        self._shortcut = ConvBN(inplanes, filters[2], 1, bias=False, norm=True) if inplanes != filters[2] else None
        self.drop_path = DropPath(drop_path_prob) if drop_path_prob > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(x)
        shortcut = x if self._shortcut is None else self._shortcut(x)
        x = self._conv1_bn_act(x)
        if self._block_type == "axial":
            x = F.gelu(self._attention(x))
        else:
            x = self._conv2_bn_act(x)
        return self.drop_path(self._conv3_bn(x)) + shortcut


class BlockGroup(nn.Module):
    """``num_blocks`` AxialBlocks of widths [2b, b, 4b] (axial) or [b, b, 4b] (bottleneck)."""

    def __init__(self, inplanes: int, base: int, num_blocks: int, block_type: str, lengths: Tuple[int, int],
                 drop_path_prob: float = 0.0):
        super().__init__()
        filters = [2 * base if block_type == "axial" else base, base, 4 * base]
        self._blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self._blocks.append(AxialBlock(inplanes, filters, block_type, lengths, drop_path_prob))
            inplanes = filters[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._blocks:
            x = block(x)
        return x


def resize_aligned(x: torch.Tensor, size: Sequence[int], ref: int) -> torch.Tensor:
    """Bilinear resize with DeepLab2's convention: corners aligned when ``ref`` (a side of the
    source or of the padded input, as each caller of the official code picks) is odd."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=ref % 2 == 1)


class ResizedFuse(nn.Module):
    """Upsample the coarser map to the finer one's size and add them, each projected to
    ``out_channels`` (GELU + 1x1 conv + BN) when its width differs."""

    def __init__(self, low_in_channels: int, high_in_channels: int, out_channels: int):
        super().__init__()
        if low_in_channels != out_channels:
            self._conv_bn_low = ConvBN(low_in_channels, out_channels, 1, bias=False, norm=True)
        if high_in_channels != out_channels:
            self._conv_bn_high = ConvBN(high_in_channels, out_channels, 1, bias=False, norm=True)

    def forward(self, lowres_x: torch.Tensor, highres_x: torch.Tensor) -> torch.Tensor:
        width = lowres_x.shape[-1]
        if hasattr(self, "_conv_bn_low"):
            lowres_x = self._conv_bn_low(F.gelu(lowres_x))
        lowres_x = resize_aligned(lowres_x, highres_x.shape[-2:], width)
        if hasattr(self, "_conv_bn_high"):
            highres_x = self._conv_bn_high(F.gelu(highres_x))
        return lowres_x + highres_x


@PIXEL_DECODER_REGISTRY.register()
class kMaXPixelDecoder(nn.Module):
    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, dec_layers: Sequence[int], dec_channels: Sequence[int],
                 layer_types: Sequence[str], drop_path_prob: float, image_size: Sequence[int]):
        super().__init__()
        # decreasing stride; ties keep the backbone's order (as the official sort does)
        shapes = sorted(input_shape.items(), key=lambda kv: -kv[1].stride)
        self.in_features = [k for k, _ in shapes]
        in_channels = [v.channels for _, v in shapes]
        self.num_stages = n = len(shapes)
        key = "MODEL.KMAX_DEEPLAB.PIXEL_DEC"
        if not (len(dec_layers) == len(dec_channels) == len(layer_types) == n) or n < 4:
            raise ValueError(f"{key}: IN_FEATURES (found in the backbone: {self.in_features}), DEC_LAYERS "
                             f"{list(dec_layers)}, DEC_CHANNELS {list(dec_channels)} and LAYER_TYPES {list(layer_types)} "
                             "need one entry per stage, at least 4")
        bad = [t for t in layer_types if t.lower() not in LAYER_TYPES]
        if bad:
            raise ValueError(f"{key}.LAYER_TYPES {list(layer_types)}: unknown {bad}; use {list(LAYER_TYPES)}")
        lengths = axial_lengths(image_size, n)
        for i, (name, shape) in enumerate(shapes):
            # the tables must cover the feature the backbone makes of a padded input: ceil(size / stride)
            actual = tuple(-(-side // shape.stride) for side in image_size)
            if layer_types[i].lower() == "axial" and lengths[i] != actual:
                raise ValueError(
                    f"INPUT.IMAGE_SIZE {list(image_size)}: the axial attention on {name} (stride {shape.stride}) has "
                    f"position tables of {lengths[i]} but the feature is {actual}; use odd sizes (e.g. 1281 = 40 * 32 + 1) "
                    f"or multiples of {shape.stride}")
        self._in_norms = nn.ModuleList([LayerNorm2d(c) for c in in_channels])
        self._stages = nn.ModuleList()
        self._resized_fuses = nn.ModuleList()
        for i in range(n):
            self._stages.append(BlockGroup(in_channels[0] if i == 0 else dec_channels[i], dec_channels[i],
                                           dec_layers[i], layer_types[i].lower(), lengths[i], drop_path_prob))
            if i > 0:
                self._resized_fuses.append(ResizedFuse(4 * dec_channels[i - 1], in_channels[i], dec_channels[i]))
        self.out_channels = [4 * c for c in dec_channels]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        p = cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC
        missing = [f for f in p.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.KMAX_DEEPLAB.PIXEL_DEC.IN_FEATURES {list(p.IN_FEATURES)}: the backbone does not "
                             f"return {missing} (it returns {list(input_shape)})")
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in p.IN_FEATURES},
            "dec_layers": list(p.DEC_LAYERS),
            "dec_channels": list(p.DEC_CHANNELS),
            "layer_types": list(p.LAYER_TYPES),
            "drop_path_prob": p.DROP_PATH_PROB,
            "image_size": image_size_hw(cfg.INPUT.IMAGE_SIZE),
        }

    def forward_features(self, features: Dict[str, torch.Tensor]):
        """-> (panoptic_features, semantic_features, multi_scale_features); see the module docstring."""
        outs = []
        x = self._in_norms[0](features[self.in_features[0]])
        for i in range(self.num_stages - 1):
            x = self._stages[i](x)
            outs.append(x)
            x = self._resized_fuses[i](x, self._in_norms[i + 1](features[self.in_features[i + 1]]))
        outs.append(self._stages[-1](x))
        semantic = [features[self.in_features[i]] for i in (0, 2, 3)]
        return outs[-1], semantic, outs[:3]

    def forward(self, features: Dict[str, torch.Tensor]):
        return self.forward_features(features)
