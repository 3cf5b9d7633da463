"""Model building: importing this module registers every component under its official name."""
import logging

from ..utils.registry import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PIXEL_DECODER_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
    TRANSFORMER_DECODER_REGISTRY,
)
from . import backbone, heads, pixel_decoder, transformer_decoder  # noqa: F401  (registration)
from .backbone import build_backbone
from .heads import MaskFormerHead, build_pixel_decoder, build_sem_seg_head, build_transformer_decoder
from .meta_arch import MaskFormer


def build_model(cfg):
    """Build the model named by MODEL.META_ARCHITECTURE on MODEL.DEVICE (no weights loaded;
    see ``mask2former.load_checkpoint`` and MODEL.WEIGHTS)."""
    import torch

    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        raise KeyError(f"MODEL.META_ARCHITECTURE = {name!r} is not registered; known: "
                       f"{sorted(k for k, _ in META_ARCH_REGISTRY)}")
    model = META_ARCH_REGISTRY.get(name)(cfg)
    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("MODEL.DEVICE is %r but CUDA is not available; using the CPU", device)
        device = "cpu"
    return model.to(torch.device(device))
