"""kMaXDeepLabHead: the kMaX pixel decoder + the kMaX transformer decoder (keys
``pixel_decoder.*``, ``predictor.*``), named by MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME and
MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME (looked up in PIXEL_DECODER_REGISTRY, or the class's
``pixel_decoder_registry``, and TRANSFORMER_DECODER_REGISTRY; the transformer decoder is called as
``cls(cfg, input_shape)``).
"""
from typing import Dict

from ...layers import ShapeSpec
from ...utils.registry import PIXEL_DECODER_REGISTRY, SEM_SEG_HEADS_REGISTRY, TRANSFORMER_DECODER_REGISTRY
from .mask_former_head import MaskFormerHead, _lookup

__all__ = ["kMaXDeepLabHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class kMaXDeepLabHead(MaskFormerHead):
    """backbone features -> pixel decoder -> transformer decoder -> {"pred_logits", "pred_masks", ...}:
    MaskFormerHead's attributes, kMaX's builders and call (the transformer decoder also takes the
    pixel decoder's last output and the backbone features for its auxiliary semantic head)."""

    # where PIXEL_DEC.NAME is looked up (the Detectron2 adapter's subclass: Detectron2's
    # SEM_SEG_HEADS registry, as the official head does)
    pixel_decoder_registry = PIXEL_DECODER_REGISTRY

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        k = cfg.MODEL.KMAX_DEEPLAB
        pixel_decoder = _lookup(cls.pixel_decoder_registry, k.PIXEL_DEC.NAME, "MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME")(
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
            "transformer_in_feature": "multi_scale_pixel_decoder",
        }

    def forward(self, features, mask=None, targets=None):
        panoptic, semantic, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, panoptic, semantic)
