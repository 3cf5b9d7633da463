"""kMaXDeepLabHead: the kMaX pixel decoder + the kMaX transformer decoder (keys
``pixel_decoder.*``, ``predictor.*``), named by MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME and
MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME (looked up in PIXEL_DECODER_REGISTRY and
TRANSFORMER_DECODER_REGISTRY; the transformer decoder is called as ``cls(cfg, input_shape)``).
"""
from typing import Dict

from torch import nn

from ...config.configurable import configurable
from ...layers import ShapeSpec
from ...utils.registry import PIXEL_DECODER_REGISTRY, SEM_SEG_HEADS_REGISTRY, TRANSFORMER_DECODER_REGISTRY
from .mask_former_head import _lookup

__all__ = ["kMaXDeepLabHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class kMaXDeepLabHead(nn.Module):
    """backbone features -> pixel decoder -> transformer decoder -> {"pred_logits", "pred_masks", ...}."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int, pixel_decoder: nn.Module,
                 transformer_predictor: nn.Module, loss_weight: float = 1.0, ignore_value: int = -1):
        super().__init__()
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        k = cfg.MODEL.KMAX_DEEPLAB
        pixel_decoder = _lookup(PIXEL_DECODER_REGISTRY, k.PIXEL_DEC.NAME, "MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME")(
            cfg, input_shape)
        if not callable(getattr(pixel_decoder, "forward_features", None)):
            raise TypeError(f"pixel decoder {k.PIXEL_DEC.NAME} must define forward_features(features)")
        predictor = _lookup(TRANSFORMER_DECODER_REGISTRY, k.TRANS_DEC.NAME, "MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME")(
            cfg, input_shape)
        return {
            "input_shape": {n: s for n, s in input_shape.items() if n in k.PIXEL_DEC.IN_FEATURES},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": pixel_decoder,
            "transformer_predictor": predictor,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def forward(self, features):
        panoptic, semantic, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, panoptic, semantic)
