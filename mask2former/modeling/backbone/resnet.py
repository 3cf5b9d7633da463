"""ResNet / ResNeXt backbones with Detectron2's module layout and state-dict names.

Keys look like ``stem.conv1.weight``, ``stem.conv1.norm.running_mean``, ``res2.0.shortcut.weight``,
``res3.1.conv2.norm.bias`` so that Detectron2 model-zoo / ImageNet checkpoints load unchanged.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, c2_msra_fill, get_norm, tf_batch_norm
from ...utils.registry import BACKBONE_REGISTRY
from .backbone import Backbone


__all__ = [
    "CNNBlockBase",
    "BasicStem",
    "DeepLabStem",
    "BasicBlock",
    "BottleneckBlock",
    "ResNet",
    "build_resnet_backbone",
    "custom_bn_build_resnet_backbone",
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
    """A block with known ``in_channels``, ``out_channels`` and spatial ``stride``."""

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


class BasicStem(CNNBlockBase):
    """conv1 7x7/2 + norm + ReLU, then max-pool 3x3/2: (N, C, H, W) -> (N, out, ~H/4, ~W/4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = _conv(in_channels, out_channels, 7, stride=2, norm=norm)

    def forward(self, x):
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class DeepLabStem(CNNBlockBase):
    """Three 3x3 convs (stride 2, 1, 1; widths out/2, out/2, out) + ReLU each, then max-pool 3x3/2."""

    def __init__(self, in_channels: int = 3, out_channels: int = 128, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        self.conv1 = _conv(in_channels, mid, 3, stride=2, norm=norm)
        self.conv2 = _conv(mid, mid, 3, norm=norm)
        self.conv3 = _conv(mid, out_channels, 3, norm=norm)

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        return F.max_pool2d(F.relu_(self.conv3(x)), kernel_size=3, stride=2, padding=1)


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

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (N, C, H, W) -> {name: (N, C_name, ceil-ish(H/stride), ceil-ish(W/stride))}."""
        if x.dim() != 4:
            raise ValueError(f"ResNet takes an input of shape (N, C, H, W); got {tuple(x.shape)}")
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


def _build_resnet(cfg, input_shape: ShapeSpec, norm=None, stem_type: Optional[str] = None,
                  deeplab_dilations: bool = True, resnet_cls: type = None) -> ResNet:
    """``norm`` / ``stem_type`` (None: MODEL.RESNETS.NORM / STEM_TYPE); ``deeplab_dilations``
    False ignores RES4_DILATION and RES5_MULTI_GRID (Detectron2's builder has neither);
    ``resnet_cls``: a subclass of ResNet to build (None: ResNet)."""
    r = cfg.MODEL.RESNETS
    norm = r.NORM if norm is None else norm
    in_channels = input_shape.channels if input_shape is not None and input_shape.channels else 3
    stem_type = r.STEM_TYPE if stem_type is None else stem_type
    if stem_type == "basic":
        stem = BasicStem(in_channels, r.STEM_OUT_CHANNELS, norm=norm)
    elif stem_type == "deeplab":
        stem = DeepLabStem(in_channels, r.STEM_OUT_CHANNELS, norm=norm)
    else:
        raise ValueError(f"Unknown MODEL.RESNETS.STEM_TYPE {stem_type!r}; expected 'basic' or 'deeplab'")
    if any(r.DEFORM_ON_PER_STAGE):
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
        res4_dilation=r.RES4_DILATION if deeplab_dilations else 1,
        res5_dilation=r.RES5_DILATION,
        res5_multi_grid=r.RES5_MULTI_GRID if deeplab_dilations else (1, 1, 1),
        num_stages=num_stages,
    )
    return (resnet_cls or ResNet)(stem, stages, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet from ``cfg.MODEL.RESNETS`` / ``cfg.MODEL.BACKBONE.FREEZE_AT`` (Detectron2's builder,
    also honouring the DeepLab keys STEM_TYPE, RES4_DILATION and RES5_MULTI_GRID, which every
    official Mask2Former config sets to their no-op values "basic", 1 and [1, 1, 1])."""
    return _build_resnet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_resnet_deeplab_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """Alias of Detectron2's DeepLab-project builder name (same options)."""
    return _build_resnet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def custom_bn_build_resnet_backbone(cfg, input_shape: ShapeSpec, *, resnet_cls: type = None) -> ResNet:
    """kMaX-DeepLab's ResNet: Detectron2's layout and keys (basic stem, MODEL.RESNETS.DEPTH,
    widths, STRIDE_IN_1X1, RES5_DILATION 1 or 2) with trainable batch norm of TensorFlow's eps
    1e-3 and momentum 0.01 (NORM "SyncBN"; "" or "none": no norm). STEM_TYPE, RES4_DILATION and
    RES5_MULTI_GRID are not read, as in the official builder. ``resnet_cls``: a subclass of
    ResNet to build (the Detectron2 adapter's)."""
    r = cfg.MODEL.RESNETS
    name = str(r.NORM).lower()
    if name not in ("syncbn", "", "none"):
        # the official builder silently builds no norm at all for any other name
        raise ValueError(f"MODEL.RESNETS.NORM {r.NORM!r} is not supported by custom_bn_build_resnet_backbone; use "
                         "'SyncBN' (batch norm with eps 1e-3, momentum 0.01) or 'none'")
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2 for custom_bn_build_resnet_backbone, "
                         f"got {r.RES5_DILATION}")
    norm = tf_batch_norm if name == "syncbn" else ""
    return _build_resnet(cfg, input_shape, norm=norm, stem_type="basic", deeplab_dilations=False,
                         resnet_cls=resnet_cls)
