"""Conv2d carrying an optional norm and activation (state-dict keys ``<name>.weight``,
``<name>.norm.*``), the layout the official checkpoints use."""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .blocked import blocked_view
from .norm import FrozenBatchNorm2d


class Conv2d(nn.Conv2d):
    def __init__(self, *args, norm: nn.Module = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def forward_act(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
        """``self(x)``, then ``+= residual`` and ``relu_`` when asked (the ResNet block tail):
        (N, C_in, H, W) -> (N, C_out, H', W'), residual of the output's shape.

        With a FrozenBatchNorm2d and no activation the norm, the add and the ReLU go through
        ``FrozenBatchNorm2d.forward_act``, one pass over the conv output where the compiled
        kernel allows; bitwise equal to the plain sequence. That bypasses the modules' __call__,
        so with forward hooks on this conv or its norm the plain sequence runs instead.
        An opaque ``to_mkldnn()`` x (FrozenBatchNorm2d norm, no activation, no hooks: the
        caller's checks) gives an opaque result (see ``layers.blocked``).
        """
        if x.is_mkldnn:
            # channel-blocked activations (layers.blocked): oneDNN's conv without its reorders,
            # then the norm, add and ReLU on the output's memory in place
            y = torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                         self.groups)
            self.norm.forward_act(blocked_view(y), None if residual is None else blocked_view(residual), relu,
                                  inplace=True)
            return y
        if (isinstance(self.norm, FrozenBatchNorm2d) and self.activation is None
                and not _has_hooks(self) and not _has_hooks(self.norm)):
            return self.norm.forward_act(super().forward(x), residual, relu, inplace=True)
        out = self(x)
        if residual is not None:
            out += residual
        return F.relu_(out) if relu else out


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2-style XavierFill: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_msra_fill(module: nn.Module) -> None:
    """Caffe2-style MSRAFill: kaiming-normal fan_out for ReLU, zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)
