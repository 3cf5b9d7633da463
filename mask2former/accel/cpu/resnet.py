"""ResNet inference on the CPU: fused frozen batch norm, channel-blocked activations, a
channels-last stem pool. Same bits as ``modeling/backbone/resnet.py``.

* Stems and blocks run each FrozenBatchNorm2d together with the residual add and ReLU after it as
  one pass over the conv output (``ops.frozen_bn_act``), where their plain forward makes three.
* ``FastResNet`` keeps the activations in oneDNN's channel-blocked layout from one convolution to
  the next (``blocked.py``): the same conv kernels without their input and output reorders. The
  layout is oneDNN's choice, so the first call at each input size runs the NCHW path too and
  compares every output bit for bit; only a size that matched runs blocked (``VerifiedOnce``).
* The stem's 3x3/2 max-pool runs through torch's channels-last kernel, several times faster than
  its NCHW one (which also computes indices); a maximum is exact either way.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...layers import Conv2d, FrozenBatchNorm2d
from ...modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, CNNBlockBase, DeepLabStem, ResNet
from ...ops.frozen_bn import frozen_bn_act, frozen_bn_act_compiled, frozen_bn_act_uses_compiled
from ..core import accelerates, inference_active, plain_type, verified
from .blocked import block_size, blocked_view

__all__ = ["conv_norm_act", "stem_max_pool", "FastResNet"]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _norm_act(norm: FrozenBatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """``relu_(norm(x) + residual)`` in one pass where the compiled kernel runs; x, a temporary,
    may hold the result. x may be channel-blocked (N, C/B, H, W, B)."""
    params = [t.to(x.dtype) for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)]
    if x.dim() == 5 or frozen_bn_act_uses_compiled(x, *params, residual):
        return frozen_bn_act(x, *params, norm.eps, residual=residual, relu=relu, inplace=True)
    out = norm(x)
    if residual is not None:
        out += residual
    return F.relu_(out) if relu else out


def conv_norm_act(conv: Conv2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                  relu: bool = False) -> torch.Tensor:
    """``conv(x)``, then ``+= residual`` and ``relu_`` when asked (a ResNet block's tail):
    (N, C_in, H, W) -> (N, C_out, H', W'), bitwise the plain sequence.

    With a FrozenBatchNorm2d and no activation, the norm, the add and the ReLU are one pass. That
    bypasses the modules' __call__, so with forward hooks on the conv or its norm the plain
    sequence runs. An opaque ``to_mkldnn()`` x (the caller checked the conv) gives an opaque
    result: oneDNN's conv without reorders, then the norm, add and ReLU on its memory in place.
    """
    if x.is_mkldnn:
        y = torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation,
                                     conv.groups)
        _norm_act(conv.norm, blocked_view(y), None if residual is None else blocked_view(residual), relu)
        return y
    if (isinstance(conv.norm, FrozenBatchNorm2d) and conv.activation is None
            and not _has_hooks(conv) and not _has_hooks(conv.norm)):
        return _norm_act(conv.norm, nn.Conv2d.forward(conv, x), residual, relu)
    out = conv(x)
    if residual is not None:
        out += residual
    return F.relu_(out) if relu else out


def stem_max_pool(x: torch.Tensor) -> torch.Tensor:
    """The stems' 3x3/2 max-pool; an opaque (channel-blocked) x stays so."""
    if x.is_mkldnn:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size=3, stride=2, padding=1)
    return pooled.contiguous()


def _fused(block: CNNBlockBase, x: torch.Tensor) -> bool:
    if x.is_mkldnn:  # channel-blocked, from FastResNet, which checked the rest
        return True
    return (inference_active(block) and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous())


@accelerates(BasicStem)
class FastBasicStem(BasicStem):
    def forward(self, x):
        if not _fused(self, x):
            return super().forward(x)
        return stem_max_pool(conv_norm_act(self.conv1, x, relu=True))


@accelerates(DeepLabStem)
class FastDeepLabStem(DeepLabStem):
    def forward(self, x):
        if not _fused(self, x):
            return super().forward(x)
        x = conv_norm_act(self.conv1, x, relu=True)
        x = conv_norm_act(self.conv2, x, relu=True)
        return stem_max_pool(conv_norm_act(self.conv3, x, relu=True))


@accelerates(BasicBlock)
class FastBasicBlock(BasicBlock):
    def forward(self, x):
        if not _fused(self, x):
            return super().forward(x)
        out = conv_norm_act(self.conv1, x, relu=True)
        shortcut = x if self.shortcut is None else conv_norm_act(self.shortcut, x)
        return conv_norm_act(self.conv2, out, residual=shortcut, relu=True)


@accelerates(BottleneckBlock)
class FastBottleneckBlock(BottleneckBlock):
    def forward(self, x):
        if not _fused(self, x):
            return super().forward(x)
        out = conv_norm_act(self.conv1, x, relu=True)
        out = conv_norm_act(self.conv2, out, relu=True)
        shortcut = x if self.shortcut is None else conv_norm_act(self.shortcut, x)
        return conv_norm_act(self.conv3, out, residual=shortcut, relu=True)


_FAST_BLOCKS = (FastBasicStem, FastDeepLabStem, FastBasicBlock, FastBottleneckBlock)


def blockable(resnet: ResNet) -> bool:
    """Whether every convolution of ``resnet`` can run on channel-blocked activations: standard
    stem and blocks, each conv a bias-free-or-not Conv2d with a FrozenBatchNorm2d and no
    activation, zero padding, whole channel blocks; the compiled frozen batch norm and readable
    opaque memory available."""
    b = block_size()
    if b is None or not frozen_bn_act_compiled():
        return False
    if plain_type(resnet.stem) not in (BasicStem, DeepLabStem):
        return False
    for name in resnet.stage_names:
        if any(plain_type(blk) not in (BasicBlock, BottleneckBlock) for blk in getattr(resnet, name)):
            return False
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d) and not (
                isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d) and m.activation is None
                and m.padding_mode == "zeros" and isinstance(m.padding, tuple) and m.out_channels % b == 0):
            return False
    return True


@accelerates(ResNet, eligible=blockable)
class FastResNet(ResNet):
    def blocked_allowed(self, x: torch.Tensor) -> bool:
        """The per-call conditions of the channel-blocked path: inference on a contiguous CPU
        float32 input, not traced (opaque tensors and raw memory views do not trace), every stem
        and block accelerated, no hooks (they would see opaque tensors), more than one thread:
        with one thread torch runs the 1x1 convolutions of fewer than 16 NCHW images on its native
        kernel, not oneDNN's, so the blocked path could never give the same bits."""
        if not (inference_active(self) and x.device.type == "cpu" and x.dtype == torch.float32
                and x.is_contiguous() and not torch.compiler.is_compiling() and torch.get_num_threads() > 1):
            return False
        for m in self.modules():
            if _has_hooks(m):
                return False
            if isinstance(m, CNNBlockBase) and not isinstance(m, _FAST_BLOCKS):
                return False
        return True

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or not self.blocked_allowed(x):
            return super().forward(x)

        def blocked():
            return {k: v.to_dense() for k, v in super(FastResNet, self).forward(x.to_mkldnn()).items()}

        def plain():
            return super(FastResNet, self).forward(x)

        def same(a, b):
            return all(torch.equal(a[k], b[k]) for k in b)

        return verified(self).run(("blocked", tuple(x.shape)), blocked, plain, same)
