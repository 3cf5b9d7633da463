"""Config system: Detectron2-compatible defaults plus the Mask2Former, DeepLab and kMaX-DeepLab keys."""
from .config import (
    CfgNode,
    ConfigKeyError,
    ConfigTypeError,
    UnsafeConfigError,
    add_deeplab_config,
    add_kmax_deeplab_config,
    add_maskformer2_config,
    get_cfg,
    image_size_hw,
)
from .configurable import configurable

__all__ = [
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "UnsafeConfigError",
    "add_deeplab_config",
    "add_kmax_deeplab_config",
    "add_maskformer2_config",
    "configurable",
    "get_cfg",
    "image_size_hw",
]
