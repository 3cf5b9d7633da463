"""ResNet / ResNeXt backbones with Detectron2's module layout and state-dict names.

Keys look like ``stem.conv1.weight``, ``stem.conv1.norm.running_mean``, ``res2.0.shortcut.weight``,
``res3.1.conv2.norm.bias`` so that Detectron2 model-zoo / ImageNet checkpoints load unchanged.
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, c2_msra_fill, get_norm
from ...layers.blocked import block_size
from ...ops.frozen_bn import frozen_bn_act_compiled
from ...utils.registry import BACKBONE_REGISTRY
from .backbone import Backbone

logger = logging.getLogger(__name__)

__all__ = [
    "CNNBlockBase",
    "BasicStem",
    "DeepLabStem",
    "BasicBlock",
    "BottleneckBlock",
    "ResNet",
    "build_resnet_backbone",
]

_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def _conv(in_ch, out_ch, k, *, stride=1, dilation=1, groups=1, norm="BN") -> Conv2d:
    """Bias-free kxk conv ("same" padding for odd k) followed by ``norm``, MSRA-initialised."""
    conv = Conv2d(
        in_ch, out_ch, kernel_size=k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
        groups=groups, bias=False, norm=get_norm(norm, out_ch),
    )
    c2_msra_fill(conv)
    return conv


class CNNBlockBase(nn.Module):
    """A block with known ``in_channels``, ``out_channels`` and spatial ``stride``.

    ``fast_inference`` (default True): in eval mode without autograd, on CPU float32 contiguous
    input, the ResNet blocks and stems run each FrozenBatchNorm2d together with the residual add
    and ReLU after it as one pass (``Conv2d.forward_act``); the outputs are bitwise those of the
    plain path, which ``fast_inference = False`` selects.
    """

    fast_inference = True

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def freeze(self) -> "CNNBlockBase":
        """Stop gradients to every parameter and replace BatchNorms by FrozenBatchNorm2d."""
        for p in self.parameters():
            p.requires_grad = False
        FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        return self

    def _use_fused(self, x: torch.Tensor) -> bool:
        if x.is_mkldnn:  # channel-blocked, from ResNet's fast path, which checked the rest
            return True
        return (
            self.fast_inference
            and not self.training
            and not (torch.is_grad_enabled() and x.requires_grad)
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.is_contiguous()
        )


class BasicStem(CNNBlockBase):
    """conv1 7x7/2 + norm + ReLU, then max-pool 3x3/2: (N, C, H, W) -> (N, out, ~H/4, ~W/4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = _conv(in_channels, out_channels, 7, stride=2, norm=norm)

    def forward(self, x):
        if self._use_fused(x):
            return _stem_max_pool(self.conv1.forward_act(x, relu=True))
        return _stem_max_pool(F.relu_(self.conv1(x)))


def _stem_max_pool(x):
    """3x3/2 max-pool. Without autograd torch's channels-last kernel is several times faster
    than its NCHW one (which also computes indices); a maximum is exact either way. Opaque
    (channel-blocked) x stays so."""
    if x.is_mkldnn:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    if x.dim() == 4 and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad):
        pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size=3, stride=2, padding=1)
        return pooled.contiguous()
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class DeepLabStem(CNNBlockBase):
    """Three 3x3 convs (stride 2, 1, 1; widths out/2, out/2, out) + ReLU each, then max-pool 3x3/2."""

    def __init__(self, in_channels: int = 3, out_channels: int = 128, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        self.conv1 = _conv(in_channels, mid, 3, stride=2, norm=norm)
        self.conv2 = _conv(mid, mid, 3, norm=norm)
        self.conv3 = _conv(mid, out_channels, 3, norm=norm)

    def forward(self, x):
        if self._use_fused(x):
            x = self.conv1.forward_act(x, relu=True)
            x = self.conv2.forward_act(x, relu=True)
            return _stem_max_pool(self.conv3.forward_act(x, relu=True))
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        return _stem_max_pool(F.relu_(self.conv3(x)))


class BasicBlock(CNNBlockBase):
    """Two 3x3 convs with a residual (ResNet-18/34); 1x1 projection shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm="BN"):
        super().__init__(in_channels, out_channels, stride)
        # Created before conv1 so that the state-dict order matches Detectron2's.
        self.shortcut = (
            _conv(in_channels, out_channels, 1, stride=stride, norm=norm)
            if in_channels != out_channels
            else None
        )
        self.conv1 = _conv(in_channels, out_channels, 3, stride=stride, norm=norm)
        self.conv2 = _conv(out_channels, out_channels, 3, norm=norm)

    def forward(self, x):
        if self._use_fused(x):
            out = self.conv1.forward_act(x, relu=True)
            shortcut = x if self.shortcut is None else self.shortcut.forward_act(x)
            return self.conv2.forward_act(out, residual=shortcut, relu=True)
        out = self.conv2(F.relu_(self.conv1(x)))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class BottleneckBlock(CNNBlockBase):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 with a residual (ResNet-50/101/152, ResNeXt).

    ``stride_in_1x1`` puts the stride on the first 1x1 conv (MSRA weights) instead of the 3x3.
    The last norm is *not* zero-initialised (Detectron2 leaves that disabled).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm="BN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = (
            _conv(in_channels, out_channels, 1, stride=stride, norm=norm)
            if in_channels != out_channels
            else None
        )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride=stride_1x1, norm=norm)
        self.conv2 = _conv(
            bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, dilation=dilation,
            groups=num_groups, norm=norm,
        )
        self.conv3 = _conv(bottleneck_channels, out_channels, 1, norm=norm)

    def forward(self, x):
        if self._use_fused(x):
            out = self.conv1.forward_act(x, relu=True)
            out = self.conv2.forward_act(out, relu=True)
            shortcut = x if self.shortcut is None else self.shortcut.forward_act(x)
            return self.conv3.forward_act(out, residual=shortcut, relu=True)
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class ResNet(Backbone):
    """Stem followed by stages ``res2``..``res5``; returns ``{name: (N, C, H/stride, W/stride)}``.

    Args:
        stem: a CNNBlockBase (``BasicStem`` / ``DeepLabStem``).
        stages: list of lists of CNNBlockBase; stage i is registered as ``res{i+2}``.
        out_features: names to return ("stem", "res2".."res5"); stages after the last requested
            one are not built (as in Detectron2, so their keys are absent).
        freeze_at: 0 freezes nothing, 1 the stem, k the stem and the first k-1 stages.
    """

    def __init__(
        self,
        stem: CNNBlockBase,
        stages: List[List[CNNBlockBase]],
        out_features: Optional[Sequence[str]] = None,
        freeze_at: int = 0,
    ):
        super().__init__()
        self.stem = stem
        stride = stem.stride
        self._out_feature_strides = {"stem": stride}
        self._out_feature_channels = {"stem": stem.out_channels}
        if out_features is not None:
            order = {"stem": 0, "res2": 1, "res3": 2, "res4": 3, "res5": 4}
            unknown = [f for f in out_features if f not in order]
            if unknown or not out_features:
                raise ValueError(f"Unsupported ResNet OUT_FEATURES {list(out_features)}; use {list(order)}")
            stages = stages[: max(order[f] for f in out_features)]
        self.stage_names = []
        for i, blocks in enumerate(stages):
            if not blocks:
                raise ValueError(f"ResNet stage res{i + 2} has no blocks")
            name = f"res{i + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            for block in blocks:
                stride *= block.stride
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = blocks[-1].out_channels
        self._out_features = list(out_features) if out_features is not None else [self.stage_names[-1]]
        self.freeze(freeze_at)
        # input shape -> whether the channel-blocked fast path matched the NCHW path (forward)
        self._blocked_exact: Dict[tuple, bool] = {}

    @property
    def fast_inference(self) -> bool:
        """Whether the stem and every block may take the fused inference path (see
        ``CNNBlockBase``); setting it sets theirs."""
        return all(m.fast_inference for m in self.modules() if isinstance(m, CNNBlockBase))

    @fast_inference.setter
    def fast_inference(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, CNNBlockBase):
                m.fast_inference = bool(value)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (N, C, H, W) -> {name: (N, C_name, ceil-ish(H/stride), ceil-ish(W/stride))}.

        Fast CPU inference keeps the activations in oneDNN's channel-blocked layout between
        convolutions (``layers.blocked``). The first call at each input size also runs the NCHW
        path and compares every output bit for bit; only a size that matched is run blocked."""
        if x.dim() != 4:
            raise ValueError(f"ResNet takes an input of shape (N, C, H, W); got {tuple(x.shape)}")
        if not self._blocked_allowed(x):
            return self._forward(x)
        key = tuple(x.shape)
        exact = self._blocked_exact.get(key)
        if exact is None:
            plain = self._forward(x)
            blocked = self._forward(x.to_mkldnn())
            exact = self._blocked_exact[key] = all(torch.equal(plain[k], blocked[k].to_dense()) for k in plain)
            if not exact:
                logger.info("ResNet: channel-blocked convolutions differ from NCHW ones at input %s; not used", key)
            return plain
        if not exact:
            return self._forward(x)
        return {k: v.to_dense() for k, v in self._forward(x.to_mkldnn()).items()}

    def _blocked_allowed(self, x: torch.Tensor) -> bool:
        """Whether every stem / block convolution can run on channel-blocked activations:
        fused inference allowed everywhere (CPU float32, grad mode off), compiled frozen batch
        norm, FrozenBatchNorm2d after each conv, whole channel blocks, no hooks."""
        if torch.compiler.is_compiling():  # opaque tensors and raw memory views do not trace
            return False
        if not (self.fast_inference and not self.training and x.device.type == "cpu" and x.dtype == torch.float32
                and x.is_contiguous() and not torch.is_grad_enabled() and frozen_bn_act_compiled()):
            return False
        b = block_size()
        if b is None:
            return False
        for m in self.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return False
            if isinstance(m, nn.Conv2d):
                if not (isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d) and m.activation is None
                        and m.padding_mode == "zeros" and isinstance(m.padding, tuple) and m.out_channels % b == 0):
                    return False
            elif not isinstance(m, (CNNBlockBase, ResNet, nn.Sequential, FrozenBatchNorm2d)):
                return False
        return type(self.stem) in (BasicStem, DeepLabStem) and all(
            type(blk) in (BasicBlock, BottleneckBlock) for name in self.stage_names for blk in getattr(self, name))

    def _forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def freeze(self, freeze_at: int = 0) -> "ResNet":
        """Freeze the stem (freeze_at >= 1) and stages res2..res{freeze_at} (requires_grad False,
        BatchNorm -> FrozenBatchNorm2d)."""
        if freeze_at >= 1:
            self.stem.freeze()
        for idx, name in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                for block in getattr(self, name).children():
                    block.freeze()
        return self

    @staticmethod
    def make_stage(block_class, num_blocks: int, *, in_channels: int, out_channels: int, **kwargs):
        """Build ``num_blocks`` blocks; a kwarg ``foo_per_block`` (a list) gives block i ``foo=v[i]``."""
        blocks = []
        for i in range(num_blocks):
            block_kwargs = {}
            for k, v in kwargs.items():
                if k.endswith("_per_block"):
                    if len(v) != num_blocks:
                        raise ValueError(f"{k} has {len(v)} entries for {num_blocks} blocks")
                    block_kwargs[k[: -len("_per_block")]] = v[i]
                else:
                    block_kwargs[k] = v
            blocks.append(block_class(in_channels=in_channels, out_channels=out_channels, **block_kwargs))
            in_channels = out_channels
        return blocks


def make_resnet_stages(
    depth: int,
    *,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = False,
    norm="BN",
    res4_dilation: int = 1,
    res5_dilation: int = 1,
    res5_multi_grid: Sequence[int] = (1, 1, 1),
    num_stages: int = 4,
) -> List[List[CNNBlockBase]]:
    """Stages res2.. of a ResNet following Detectron2's ``build_resnet_backbone`` and, for the
    dilation options, DeepLab's ``build_resnet_deeplab_backbone`` (identical at their defaults).

    A dilated stage keeps stride 1 (so res5 with dilation 2 has stride 16). RES5_MULTI_GRID
    multiplies the res5 dilation per block.
    """
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
    if res4_dilation not in (1, 2) or res5_dilation not in (1, 2, 4):
        raise ValueError(f"Unsupported dilations res4={res4_dilation}, res5={res5_dilation}")
    if res4_dilation == 2 and res5_dilation != 4:
        raise ValueError("RES4_DILATION 2 requires RES5_DILATION 4")
    blocks_per_stage = _BLOCKS_PER_STAGE[depth]
    basic = depth < 50
    if basic and (res2_out_channels != 64 or num_groups != 1 or res4_dilation != 1 or res5_dilation != 1):
        raise ValueError(
            "ResNet-18/34 need RES2_OUT_CHANNELS 64, NUM_GROUPS 1 and no dilation "
            f"(got {res2_out_channels}, {num_groups}, res4={res4_dilation}, res5={res5_dilation})"
        )
    in_ch, out_ch, mid_ch = stem_out_channels, res2_out_channels, num_groups * width_per_group
    stages = []
    for idx in range(num_stages):
        stage_idx = idx + 2
        dilation = {4: res4_dilation, 5: res5_dilation}.get(stage_idx, 1)
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        n = blocks_per_stage[idx]
        kwargs = dict(stride_per_block=[first_stride] + [1] * (n - 1), norm=norm)
        if basic:
            block_class = BasicBlock
        else:
            block_class = BottleneckBlock
            kwargs.update(bottleneck_channels=mid_ch, stride_in_1x1=stride_in_1x1, num_groups=num_groups)
            if stage_idx == 5 and list(res5_multi_grid) != [1] * len(res5_multi_grid):
                kwargs["dilation_per_block"] = [dilation * g for g in res5_multi_grid]
            else:
                kwargs["dilation"] = dilation
        stages.append(
            ResNet.make_stage(block_class, n, in_channels=in_ch, out_channels=out_ch, **kwargs)
        )
        in_ch, out_ch, mid_ch = out_ch, out_ch * 2, mid_ch * 2
    return stages


def _build_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    r = cfg.MODEL.RESNETS
    norm = r.NORM
    in_channels = input_shape.channels if input_shape is not None and input_shape.channels else 3
    stem_type = r.get("STEM_TYPE", "basic")
    if stem_type == "basic":
        stem = BasicStem(in_channels, r.STEM_OUT_CHANNELS, norm=norm)
    elif stem_type == "deeplab":
        stem = DeepLabStem(in_channels, r.STEM_OUT_CHANNELS, norm=norm)
    else:
        raise ValueError(f"Unknown MODEL.RESNETS.STEM_TYPE {stem_type!r}; expected 'basic' or 'deeplab'")
    if any(r.get("DEFORM_ON_PER_STAGE", [])):
        raise NotImplementedError("Deformable ResNet stages (DEFORM_ON_PER_STAGE) are not supported")
    out_features = list(r.OUT_FEATURES)
    stage_of = {"stem": 1, "res2": 2, "res3": 3, "res4": 4, "res5": 5}
    num_stages = max(stage_of.get(f, 5) for f in out_features) - 1
    stages = make_resnet_stages(
        r.DEPTH,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        stride_in_1x1=r.STRIDE_IN_1X1,
        norm=norm,
        res4_dilation=r.get("RES4_DILATION", 1),
        res5_dilation=r.RES5_DILATION,
        res5_multi_grid=r.get("RES5_MULTI_GRID", [1, 1, 1]),
        num_stages=num_stages,
    )
    return ResNet(stem, stages, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet from ``cfg.MODEL.RESNETS`` / ``cfg.MODEL.BACKBONE.FREEZE_AT`` (Detectron2's builder,
    also honouring STEM_TYPE, RES4_DILATION and RES5_MULTI_GRID, which all official Mask2Former
    configs leave at their no-op defaults)."""
    return _build_resnet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_resnet_deeplab_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """Alias of Detectron2's DeepLab-project builder name (same options)."""
    return _build_resnet(cfg, input_shape)
