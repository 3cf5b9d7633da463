"""ConvNeXt backbone as kMaX-DeepLab uses it (``D2ConvNeXt``, MODEL.CONVNEXT.*).

Keys (those of the official ConvNeXt release, which kMaX's converted ImageNet checkpoints use):
``downsample_layers.0.{0: conv 4x4/4, 1: LayerNorm}``, ``downsample_layers.{1,2,3}.{0: LayerNorm,
1: conv 2x2/2}``, ``stages.<i>.<j>.{dwconv, norm, pwconv1, pwconv2, gamma}``.

Like DeepLab2's ConvNeXt encoder, the input of every downsampling is zero-padded on the bottom and
right (and by 1 on the top and left before the stem), so an odd input of size S gives features of
ceil(S / stride), which kMaX's odd input sizes (1281 = 40 * 32 + 1) rely on. Outputs: "stem" (the
patch embedding, before stage 0) and "res2".."res5" (after stages 0..3, for OUT_INDICES).
"""
from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from timm.layers import DropPath

from ...layers import LayerNorm2d, ShapeSpec
from ...utils.registry import BACKBONE_REGISTRY
from .backbone import Backbone

__all__ = ["ConvNeXtBlock", "ConvNeXt", "D2ConvNeXt"]


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> 4x MLP (GELU) -> layer scale, plus the input:
    (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for the norm and the MLP
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """Four stages of ``depths[i]`` blocks of width ``dims[i]`` (stochastic depth rising linearly
    to ``drop_path_rate``); returns {"stem", "res2".."res5"} (stages in ``out_indices`` only)."""

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-6, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"MODEL.CONVNEXT.DEPTHS and DIMS need 4 entries, got {list(depths)} and {list(dims)}")
        self.num_features = list(dims)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))]
            + [nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
               for i in range(3)])
        total = sum(depths)  # drop-path rates rising linearly from 0 (computed without torch: meta-device builds)
        rates = [drop_path_rate * j / (total - 1) if total > 1 else 0.0 for j in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dims[i], rates[first + j], layer_scale_init)
                                               for j in range(depth)]))
        self.out_indices = list(out_indices)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outs = {}
        for i in range(4):
            x = F.pad(x, (1, 2, 1, 2) if i == 0 else (0, 1, 0, 1))
            x = self.downsample_layers[i](x)
            if i == 0:
                outs["stem"] = x
            x = self.stages[i](x)
            if i in self.out_indices:
                outs[f"res{i + 2}"] = x
        return outs


@BACKBONE_REGISTRY.register()
class D2ConvNeXt(ConvNeXt, Backbone):
    """ConvNeXt from MODEL.CONVNEXT (IN_CHANNELS, DEPTHS, DIMS, DROP_PATH_RATE, LSIT: layer-scale
    init, OUT_INDICES, OUT_FEATURES)."""

    # The official class reports stride 2 for "stem" (it is 4). Kept: the kMaX pixel decoder orders
    # its inputs by stride, so this puts "stem" after "res2", as in the official model.
    _STRIDES = {"stem": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

    def __init__(self, cfg, input_shape: ShapeSpec = None):
        c = cfg.MODEL.CONVNEXT
        super().__init__(in_chans=c.IN_CHANNELS, depths=c.DEPTHS, dims=c.DIMS, drop_path_rate=c.DROP_PATH_RATE,
                         layer_scale_init=c.LSIT, out_indices=c.OUT_INDICES)
        unknown = [f for f in c.OUT_FEATURES if f not in self._STRIDES]
        if unknown:
            raise ValueError(f"MODEL.CONVNEXT.OUT_FEATURES {list(c.OUT_FEATURES)}: unknown {unknown}; "
                             f"use {list(self._STRIDES)}")
        self._out_features = list(c.OUT_FEATURES)
        self._out_feature_strides = dict(self._STRIDES)
        dims = self.num_features
        self._out_feature_channels = {"stem": dims[0], "res2": dims[0], "res3": dims[1], "res4": dims[2],
                                      "res5": dims[3]}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"ConvNeXt takes an input of shape (N, C, H, W); got {tuple(x.shape)}")
        outs = super().forward(x)
        missing = [f for f in self._out_features if f not in outs]
        if missing:
            raise ValueError(f"MODEL.CONVNEXT.OUT_FEATURES {missing} need their stage in MODEL.CONVNEXT.OUT_INDICES "
                             f"{self.out_indices}")
        return {k: outs[k] for k in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return -1
