"""Registries that map the official component names (as written in configs) to classes."""
from fvcore.common.registry import Registry

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbones, keyed by MODEL.BACKBONE.NAME; called as fn(cfg, input_shape)."

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Meta architectures, keyed by MODEL.META_ARCHITECTURE; called as cls(cfg)."

SEM_SEG_HEADS_REGISTRY = Registry("SEM_SEG_HEADS")
SEM_SEG_HEADS_REGISTRY.__doc__ = "Segmentation heads, keyed by MODEL.SEM_SEG_HEAD.NAME; cls(cfg, input_shape)."

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = (
    "Pixel decoders, keyed by MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME; cls(cfg, input_shape)."
)

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = (
    "Transformer decoders, keyed by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME; "
    "cls(cfg, in_channels, mask_classification)."
)
