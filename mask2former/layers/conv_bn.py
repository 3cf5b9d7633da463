"""``ConvBN``: a 1-D or 2-D convolution, an optional TensorFlow-style batch norm and an optional
activation, the unit DeepLab2-derived models (kMaX-DeepLab) are built from. Keys ``conv.weight``,
``conv.bias`` (with ``bias``), ``norm.{weight, bias, running_mean, running_var,
num_batches_tracked}`` (with ``norm``).

Initialisations follow DeepLab2 (TensorFlow): "he_normal" is a truncated normal of std
sqrt(2 / in_channels), "xavier_uniform", "normal" / "trunc_normal" of std 0.02; biases start at 0
and the norm's scale at ``norm_init`` (0 for the last norm of a residual branch).
"""
import math
from typing import Optional

import torch
from torch import nn
from timm.layers import trunc_normal_tf_

from .norm import tf_batch_norm

__all__ = ["ConvBN", "activation"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: Optional[str]) -> nn.Module:
    """nn.GELU / nn.ReLU by name; None or "none": identity."""
    if name is None or name.lower() == "none":
        return nn.Identity()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)} or None")
    return _ACTIVATIONS[name]()


class ConvBN(nn.Module):
    """conv -> norm -> activation: (N, C_in, L) -> (N, C_out, L') for ``conv_type`` "1d",
    (N, C_in, H, W) -> (N, C_out, H', W') for "2d"."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True, norm: bool = False,
                 act: Optional[str] = None, conv_type: str = "2d", conv_init: str = "he_normal",
                 norm_init: float = 1.0):
        super().__init__()
        conv_cls = {"1d": nn.Conv1d, "2d": nn.Conv2d}.get(conv_type)
        if conv_cls is None:
            raise ValueError(f"conv_type must be '1d' or '2d', got {conv_type!r}")
        self.conv = conv_cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias=bias)
        self.norm = tf_batch_norm(out_channels) if norm else nn.Identity()
        self.act = activation(act)
        weight = self.conv.weight
        if conv_init == "he_normal":
            trunc_normal_tf_(weight, std=math.sqrt(2.0 / in_channels))
        elif conv_init == "xavier_uniform":
            nn.init.xavier_uniform_(weight)
        elif conv_init == "normal":
            nn.init.normal_(weight, std=0.02)
        elif conv_init == "trunc_normal":
            trunc_normal_tf_(weight, std=0.02)
        else:
            raise ValueError(f"unknown conv_init {conv_init!r}")
        if bias:
            nn.init.zeros_(self.conv.bias)
        if norm:
            nn.init.constant_(self.norm.weight, norm_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))
