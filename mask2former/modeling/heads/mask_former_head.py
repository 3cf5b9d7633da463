"""MaskFormerHead: pixel decoder + transformer decoder (keys ``pixel_decoder.*``, ``predictor.*``)."""
import logging
from typing import Dict

from torch import nn

from ...config.configurable import configurable
from ...layers import ShapeSpec
from ...utils.registry import PIXEL_DECODER_REGISTRY, SEM_SEG_HEADS_REGISTRY, TRANSFORMER_DECODER_REGISTRY

logger = logging.getLogger(__name__)


def _lookup(registry, name: str, key: str):
    if name not in registry:
        raise KeyError(f"{key} = {name!r} is not registered; known: {sorted(k for k, _ in registry)}")
    return registry.get(name)


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = _lookup(PIXEL_DECODER_REGISTRY, name, "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME")(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise TypeError(f"pixel decoder {name} must define forward_features(features)")
    return model


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    cls = _lookup(TRANSFORMER_DECODER_REGISTRY, name, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME")
    return cls(cfg, in_channels, mask_classification)


def build_sem_seg_head(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.SEM_SEG_HEAD.NAME
    return _lookup(SEM_SEG_HEADS_REGISTRY, name, "MODEL.SEM_SEG_HEAD.NAME")(cfg, input_shape)


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Runs the pixel decoder, then feeds the transformer decoder with the input named by
    ``transformer_in_feature``: "multi_scale_pixel_decoder" (Mask2Former), "transformer_encoder",
    "pixel_embedding" or a backbone feature name such as "res5" (MaskFormer)."""

    _version = 2

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int, pixel_decoder: nn.Module,
                 loss_weight: float = 1.0, ignore_value: int = -1, transformer_predictor: nn.Module,
                 transformer_in_feature: str):
        super().__init__()
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda kv: kv[1].stride)]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if feature in ("transformer_encoder", "multi_scale_pixel_decoder"):
            in_channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        elif feature == "pixel_embedding":
            in_channels = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
        elif feature in input_shape:
            in_channels = input_shape[feature].channels
        else:
            raise KeyError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = {feature!r} is neither 'multi_scale_pixel_decoder', "
                f"'transformer_encoder', 'pixel_embedding' nor a backbone feature ({sorted(input_shape)})"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES},
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "transformer_in_feature": feature,
            "transformer_predictor": build_transformer_decoder(cfg, in_channels, mask_classification=True),
        }

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # before version 2 the pixel decoder's parameters sat directly under the head
        if local_metadata.get("version", 2) < 2:
            for k in [k for k in state_dict if k.startswith(prefix)]:
                rest = k[len(prefix):]
                if not rest.startswith(("predictor.", "pixel_decoder.")):
                    state_dict[prefix + "pixel_decoder." + rest] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, features, mask=None, targets=None):
        """``targets`` (training): the ground truth, for a mask-piloted predictor (MP-Former)."""
        mask_features, encoder_features, multi_scale = self.pixel_decoder.forward_features(features)
        feature = self.transformer_in_feature
        if feature == "multi_scale_pixel_decoder":
            if targets is not None:
                return self.predictor(multi_scale, mask_features, mask, targets=targets)
            return self.predictor(multi_scale, mask_features, mask)
        if feature == "transformer_encoder":
            if encoder_features is None:
                raise ValueError("TRANSFORMER_IN_FEATURE 'transformer_encoder' needs TransformerEncoderPixelDecoder")
            return self.predictor(encoder_features, mask_features, mask)
        if feature == "pixel_embedding":
            return self.predictor(mask_features, mask_features, mask)
        return self.predictor(features[feature], mask_features, mask)
