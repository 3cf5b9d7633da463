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
from .meta_arch import MaskFormer, kMaXDeepLab

logger = logging.getLogger(__name__)


def build_model(cfg, load_weights=None):
    """Build the model named by MODEL.META_ARCHITECTURE on MODEL.DEVICE, with the inference
    accelerations of :mod:`mask2former.accel` applied (``model.fast_inference = False`` removes them).

    MODEL.WEIGHTS, when set, is loaded with ``load_checkpoint``. ``load_weights``: True requires
    the file (FileNotFoundError naming MODEL.WEIGHTS otherwise); None (default) loads it if it
    exists and warns if not — official configs name ImageNet initialisations such as
    "R-50.pkl" that only training needs; False never loads.
    """
    import os

    import torch

    from ..checkpoint import load_checkpoint

    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        raise KeyError(f"MODEL.META_ARCHITECTURE = {name!r} is not registered; known: "
                       f"{sorted(k for k, _ in META_ARCH_REGISTRY)}")
    model = META_ARCH_REGISTRY.get(name)(cfg)
    # The inference accelerations sit beside modeling/ and attach to the built model (lazily
    # imported: they subclass the modules of this package).
    from ..accel import set_fast_inference

    set_fast_inference(model)
    device = cfg.MODEL.DEVICE
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %r but CUDA is not available; using the CPU", device)
        device = "cpu"
    model = model.to(torch.device(device))
    weights = cfg.MODEL.WEIGHTS
    if weights and load_weights is not False:
        if os.path.isfile(weights):
            load_checkpoint(model, weights)
        elif load_weights:
            raise FileNotFoundError(f"MODEL.WEIGHTS = {weights!r}: no such file")
        else:
            logger.warning("MODEL.WEIGHTS = %r does not exist; the model keeps its random initialisation "
                           "(set MODEL.WEIGHTS to a checkpoint, or '' to silence this)", weights)
    return model
