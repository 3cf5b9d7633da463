"""Backbones. Importing this package registers ``build_resnet_backbone``,
``build_resnet_deeplab_backbone``, ``custom_bn_build_resnet_backbone`` (kMaX-DeepLab),
``D2SwinTransformer``, ``D2SeMaskSwinTransformer`` and ``D2ConvNeXt`` in BACKBONE_REGISTRY."""
from ...layers import ShapeSpec
from ...utils.registry import BACKBONE_REGISTRY
from .backbone import Backbone
from .convnext import D2ConvNeXt
from .resnet import ResNet, build_resnet_backbone, build_resnet_deeplab_backbone, custom_bn_build_resnet_backbone
from .semask_swin import D2SeMaskSwinTransformer
from .swin import D2SwinTransformer

__all__ = [
    "Backbone",
    "ResNet",
    "build_resnet_backbone",
    "build_resnet_deeplab_backbone",
    "custom_bn_build_resnet_backbone",
    "D2SwinTransformer",
    "D2SeMaskSwinTransformer",
    "D2ConvNeXt",
    "build_backbone",
]


def build_backbone(cfg, input_shape: ShapeSpec = None) -> Backbone:
    """Build ``cfg.MODEL.BACKBONE.NAME`` from BACKBONE_REGISTRY as ``fn(cfg, input_shape)``;
    ``input_shape`` defaults to ``ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))``."""
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONE_REGISTRY:
        known = sorted(k for k, _ in BACKBONE_REGISTRY)
        raise KeyError(f"Unknown MODEL.BACKBONE.NAME {name!r}; registered backbones: {known}")
    backbone = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"Backbone {name!r} returned {type(backbone).__name__}, not a Backbone")
    return backbone
