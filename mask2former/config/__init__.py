"""Config system: Detectron2-compatible defaults plus the Mask2Former and DeepLab keys."""
from .config import (
    CfgNode,
    ConfigKeyError,
    ConfigTypeError,
    UnsafeConfigError,
    add_deeplab_config,
    add_maskformer2_config,
    get_cfg,
)
from .configurable import configurable

__all__ = [
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "UnsafeConfigError",
    "add_deeplab_config",
    "add_maskformer2_config",
    "configurable",
    "get_cfg",
]
