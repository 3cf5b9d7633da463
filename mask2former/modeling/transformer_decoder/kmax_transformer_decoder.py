"""kMaX-DeepLab's transformer decoder (``kMaXTransformerDecoder``): cluster centres (the object
queries) refined by k-means cross-attention layers on the pixel decoder's stride-32, 16 and 8
outputs, then a final prediction on its stride-4 output.

Shapes: B images, Q = NUM_OBJECT_QUERIES cluster centres of 256 channels (B, 256, Q), K classes.
Each ``kMaXTransformerLayer``:
  1. predicts class logits (B, Q, K+1) and mask logits (B, Q, h, w) from the current centres
     (``kMaXPredictor``: L2-normalised 128-d pixel embeddings dotted with 128-d mask kernels, then
     a one-channel batch norm);
  2. k-means update: every pixel is assigned to its arg-max cluster (no gradient through the
     assignment), each centre receives the sum of its pixels' values, summed in float32;
     with TRANS_DEC.ASSIGNMENT "softmax" (CMT-DeepLab's clustering) every pixel is shared among
     the clusters by the softmax over them (differentiable) and each centre receives the
     weighted sum;
  3. self-attention among the centres, then an FFN (256 -> 2048 -> 256).
Outputs: {"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H/4, W/4), "pixel_feature" (B, 128, H/4,
W/4)}, plus in training "aux_outputs" (one per layer, resized to the final size) and
"aux_semantic_pred" (when the auxiliary semantic predictor is built).
Keys follow the official model, its spelling included (``_predcitor``).
"""
import math
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from timm.layers import DropPath, trunc_normal_tf_

from ...config.configurable import configurable
from ...layers import ConvBN, ShapeSpec, tf_batch_norm
from ...utils.registry import TRANSFORMER_DECODER_REGISTRY
from ..pixel_decoder.kmax_pixel_decoder import resize_aligned
from .kmax_aux_semantic import SemanticPredictor, light_semantic_predictor

__all__ = ["ASSIGNMENTS", "kmeans_assignment", "kmeans_update", "kMaXPredictor", "kMaXTransformerLayer",
           "kMaXTransformerDecoder"]

CHANNELS = 256  # cluster centre width, fixed in the official model


ASSIGNMENTS = ("argmax", "softmax")


def _check_assignment(mode: str) -> str:
    if mode not in ASSIGNMENTS:
        raise ValueError(f"MODEL.KMAX_DEEPLAB.TRANS_DEC.ASSIGNMENT must be one of {list(ASSIGNMENTS)}, got {mode!r}")
    return mode


def kmeans_assignment(mask_logits: torch.Tensor, mode: str = "argmax") -> torch.Tensor:
    """(B, Q, h, w) mask logits -> (B, Q, h*w) assignment of every pixel to the clusters.

    "argmax" (kMaX-DeepLab): one-hot on the arg-max cluster, without gradient (a hard decision).
    "softmax" (CMT-DeepLab's clustering): the softmax over the clusters, differentiable (the
    cluster-wise softmax of its cross-attention)."""
    if _check_assignment(mode) == "softmax":
        return F.softmax(mask_logits.flatten(2).float(), dim=1)
    with torch.no_grad():
        logits = mask_logits.detach().flatten(2)
        index = logits.max(1, keepdim=True)[1]
        return torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(1, index, 1.0)


def kmeans_update(assignment: torch.Tensor, pixel_value: torch.Tensor) -> torch.Tensor:
    """Sum of each cluster's pixel values: assignment (B, Q, M), pixel_value (B, D, M) -> (B, D, Q),
    in float32 (also under AMP), differentiable in ``pixel_value``."""
    with torch.autocast(pixel_value.device.type, enabled=False):
        return torch.einsum("blm,bdm->bdl", assignment.float(), pixel_value.float())


def add_bias_towards_void(class_logits: torch.Tensor, void_prior_prob: float = 0.9) -> torch.Tensor:
    """Add log((K) p / (1 - p)) to the void logit (the last of K+1): a prior of ``p`` on void."""
    num = class_logits.shape[-1]
    bias = torch.zeros(num, dtype=class_logits.dtype, device=class_logits.device)
    bias[-1] = math.log((num - 1) * void_prior_prob / (1 - void_prior_prob))
    return class_logits + bias


class AttentionOperation(nn.Module):
    """Multi-head attention with batch-normalised similarities and output:
    q, k (B, heads, d, L), v (B, heads, c, L) -> (B, heads * c, L), GELU."""

    def __init__(self, channels_v: int, num_heads: int):
        super().__init__()
        self._batch_norm_similarity = tf_batch_norm(num_heads)
        self._batch_norm_retrieved_value = tf_batch_norm(channels_v)

    def forward(self, query, key, value):
        n, heads, c, length = value.shape
        similarity = self._batch_norm_similarity(torch.einsum("bhdl,bhdm->bhlm", query, key))
        weights = F.softmax(similarity.float(), dim=-1)
        retrieved = torch.einsum("bhlm,bhdm->bhdl", weights, value).reshape(n, heads * c, length)
        return F.gelu(self._batch_norm_retrieved_value(retrieved))


class kMaXPredictor(nn.Module):
    """Class and mask logits of cluster centres on a pixel feature (B, C_pix, h, w): the pixel
    embedding (5x5 depthwise, 1x1 to 256, 1x1 to 128 + BN, L2-normalised) dotted with 128-d mask
    kernels of the centres, then a one-channel batch norm."""

    def __init__(self, in_channel_pixel: int, num_classes: int):
        super().__init__()
        self._pixel_space_head_conv0bnact = ConvBN(in_channel_pixel, in_channel_pixel, 5, padding=2,
                                                   groups=in_channel_pixel, bias=False, norm=True, act="gelu",
                                                   conv_init="xavier_uniform")
        self._pixel_space_head_conv1bnact = ConvBN(in_channel_pixel, CHANNELS, 1, bias=False, norm=True, act="gelu")
        self._pixel_space_head_last_convbn = ConvBN(CHANNELS, 128, 1, bias=True, norm=True)
        trunc_normal_tf_(self._pixel_space_head_last_convbn.conv.weight, std=0.01)
        self._transformer_mask_head = ConvBN(CHANNELS, 128, 1, bias=False, norm=True, conv_type="1d")
        self._transformer_class_head = ConvBN(CHANNELS, num_classes, 1, conv_type="1d")
        trunc_normal_tf_(self._transformer_class_head.conv.weight, std=0.01)
        self._pixel_space_mask_batch_norm = tf_batch_norm(1)
        nn.init.constant_(self._pixel_space_mask_batch_norm.weight, 0.1)

    def forward(self, mask_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                pixel_feature: torch.Tensor) -> Dict[str, torch.Tensor]:
        pixel = self._pixel_space_head_conv1bnact(self._pixel_space_head_conv0bnact(pixel_feature))
        pixel = F.normalize(self._pixel_space_head_last_convbn(pixel), p=2, dim=1)
        class_logits = self._transformer_class_head(class_embeddings).permute(0, 2, 1).contiguous()
        kernels = self._transformer_mask_head(mask_embeddings)
        mask_logits = torch.einsum("bchw,bcn->bnhw", pixel, kernels)
        mask_logits = self._pixel_space_mask_batch_norm(mask_logits.unsqueeze(1)).squeeze(1)
        return {"class_logits": add_bias_towards_void(class_logits), "mask_logits": mask_logits,
                "pixel_feature": pixel}


class kMaXTransformerLayer(nn.Module):
    """One k-means cross-attention + self-attention + FFN layer on (B, 256, Q) cluster centres
    and a (B, in_channel_pixel, h, w) pixel feature; returns the new centres and the predictions
    made from the old ones."""

    def __init__(self, num_classes: int, in_channel_pixel: int, in_channel_query: int = CHANNELS,
                 base_filters: int = 128, num_heads: int = 8, drop_path_prob: float = 0.0,
                 assignment: str = "argmax"):
        super().__init__()
        self.assignment = _check_assignment(assignment)
        self._num_heads = num_heads
        self._bottleneck_channels = bottleneck = 2 * base_filters
        self._total_key_depth = base_filters
        self._total_value_depth = value = 2 * base_filters
        # one drop-path rate for the k-means update, the self-attention and the FFN (DeepLab2)
        self.drop_path_kmeans, self.drop_path_attn, self.drop_path_ffn = (
            DropPath(drop_path_prob) if drop_path_prob > 0 else nn.Identity() for _ in range(3))
        std = bottleneck ** -0.5
        self._query_conv1_bn_act = ConvBN(in_channel_query, bottleneck, 1, bias=False, norm=True, act="gelu",
                                          conv_type="1d")
        self._pixel_conv1_bn_act = ConvBN(in_channel_pixel, bottleneck, 1, bias=False, norm=True, act="gelu")
        self._query_qkv_conv_bn = ConvBN(bottleneck, 2 * base_filters + value, 1, bias=False, norm=True,
                                         conv_type="1d")
        trunc_normal_tf_(self._query_qkv_conv_bn.conv.weight, std=std)
        self._pixel_v_conv_bn = ConvBN(bottleneck, value, 1, bias=False, norm=True)
        trunc_normal_tf_(self._pixel_v_conv_bn.conv.weight, std=std)
        self._query_self_attention = AttentionOperation(value, num_heads)
        self._query_conv3_bn = ConvBN(value, in_channel_query, 1, bias=False, norm=True, conv_type="1d", norm_init=0.0)
        self._query_ffn_conv1_bn_act = ConvBN(in_channel_query, 2048, 1, bias=False, norm=True, act="gelu",
                                              conv_type="1d")
        self._query_ffn_conv2_bn = ConvBN(2048, in_channel_query, 1, bias=False, norm=True, conv_type="1d",
                                          norm_init=0.0)
        self._predcitor = kMaXPredictor(bottleneck, num_classes)
        self._kmeans_query_batch_norm_retrieved_value = tf_batch_norm(value)
        self._kmeans_query_conv3_bn = ConvBN(value, in_channel_query, 1, bias=False, norm=True, conv_type="1d",
                                             norm_init=0.0)

    def forward(self, pixel_feature: torch.Tensor, query_feature: torch.Tensor):
        n, _, h, w = pixel_feature.shape
        length = query_feature.shape[-1]
        pixel_space = self._pixel_conv1_bn_act(F.gelu(pixel_feature))
        query_space = self._query_conv1_bn_act(query_feature)

        # k-means cross-attention: assign pixels with the current predictions, update the centres
        pixel_value = self._pixel_v_conv_bn(pixel_space).reshape(n, self._total_value_depth, h * w)
        prediction = self._predcitor(mask_embeddings=query_space, class_embeddings=query_space,
                                     pixel_feature=pixel_space)
        update = kmeans_update(kmeans_assignment(prediction["mask_logits"], self.assignment), pixel_value)
        update = self._kmeans_query_conv3_bn(self._kmeans_query_batch_norm_retrieved_value(update))
        query_feature = query_feature + self.drop_path_kmeans(update)

        # self-attention among the centres (from the centres before the k-means update)
        qkv = self._query_qkv_conv_bn(query_space)
        key_depth = self._total_key_depth
        q, k, v = torch.split(qkv, [key_depth, key_depth, self._total_value_depth], dim=1)
        q, k, v = (t.reshape(n, self._num_heads, -1, length) for t in (q, k, v))
        attn = self._query_conv3_bn(self._query_self_attention(q, k, v))
        query_feature = F.gelu(query_feature + self.drop_path_attn(attn))

        ffn = self._query_ffn_conv2_bn(self._query_ffn_conv1_bn_act(query_feature))
        return F.gelu(query_feature + self.drop_path_ffn(ffn)), prediction


@TRANSFORMER_DECODER_REGISTRY.register()
class kMaXTransformerDecoder(nn.Module):
    """Called as ``cls(cfg, input_shape)`` with the backbone's output shapes (MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME)."""

    @configurable
    def __init__(self, *, dec_layers: Sequence[int], in_channels: Sequence[int], num_classes: int, num_queries: int,
                 drop_path_prob: float, add_aux_semantic_pred: bool, use_aux_semantic_decoder: bool,
                 input_shape_from_backbone: Dict[str, ShapeSpec], assignment: str = "argmax"):
        super().__init__()
        key = "MODEL.KMAX_DEEPLAB.TRANS_DEC"
        if len(dec_layers) != 3:
            raise ValueError(f"{key}.DEC_LAYERS needs 3 entries (layers at stride 32, 16, 8), got {list(dec_layers)}")
        if len(in_channels) != 4:
            raise ValueError(f"{key}.IN_CHANNELS needs 4 entries (the pixel decoder's stride-32, 16, 8 outputs and "
                             f"its last one), got {list(in_channels)}")
        self._num_blocks = list(dec_layers)
        self._kmax_transformer_layers = nn.ModuleList(
            kMaXTransformerLayer(num_classes + 1, in_channels[i], drop_path_prob=drop_path_prob, assignment=assignment)
            for i in range(3) for _ in range(dec_layers[i]))
        self._num_queries = num_queries
        self._cluster_centers = nn.Embedding(CHANNELS, num_queries)  # weight (256, Q): centres as columns
        trunc_normal_tf_(self._cluster_centers.weight, std=1.0)
        self._class_embedding_projection = ConvBN(CHANNELS, CHANNELS, 1, bias=False, norm=True, act="gelu",
                                                  conv_type="1d")
        self._mask_embedding_projection = ConvBN(CHANNELS, CHANNELS, 1, bias=False, norm=True, act="gelu",
                                                 conv_type="1d")
        self._predcitor = kMaXPredictor(in_channels[-1], num_classes + 1)
        self._add_aux_semantic_pred = add_aux_semantic_pred
        self._use_aux_semantic_decoder = use_aux_semantic_decoder
        if add_aux_semantic_pred:
            shapes = input_shape_from_backbone
            missing = [f for f in ("res2", "res3", "res5") if f not in shapes]
            if missing:
                raise ValueError(f"the auxiliary semantic predictor (MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT > 0) needs "
                                 f"backbone features {missing}; the backbone returns {list(shapes)}")
            if use_aux_semantic_decoder:
                self._auxiliary_semantic_predictor = SemanticPredictor(
                    shapes["res5"].channels, shapes["res3"].channels, shapes["res2"].channels, num_classes + 1)
            else:
                self._auxiliary_semantic_predictor = light_semantic_predictor(shapes["res5"].channels, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape_from_backbone: Dict[str, ShapeSpec]):
        k = cfg.MODEL.KMAX_DEEPLAB
        return {
            "dec_layers": list(k.TRANS_DEC.DEC_LAYERS),
            "in_channels": list(k.TRANS_DEC.IN_CHANNELS),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "num_queries": k.TRANS_DEC.NUM_OBJECT_QUERIES,
            "drop_path_prob": k.TRANS_DEC.DROP_PATH_PROB,
            "add_aux_semantic_pred": k.AUX_SEMANTIC_WEIGHT > 0,
            "use_aux_semantic_decoder": k.USE_AUX_SEMANTIC_DECODER,
            "input_shape_from_backbone": input_shape_from_backbone,
            "assignment": k.TRANS_DEC.ASSIGNMENT,
        }

    def forward(self, x: List[torch.Tensor], panoptic_features: torch.Tensor,
                semantic_features: List[torch.Tensor]) -> Dict:
        """x: the pixel decoder's stride-32, 16 and 8 outputs; panoptic_features: its last output;
        semantic_features: backbone features for the auxiliary semantic predictor."""
        centres = self._cluster_centers.weight.unsqueeze(0).repeat(x[0].shape[0], 1, 1)
        predictions = []
        layers = iter(self._kmax_transformer_layers)
        for feature, num in zip(x, self._num_blocks):
            for _ in range(num):
                centres, prediction = next(layers)(pixel_feature=feature, query_feature=centres)
                predictions.append(prediction)
        final = self._predcitor(class_embeddings=self._class_embedding_projection(centres),
                                mask_embeddings=self._mask_embedding_projection(centres),
                                pixel_feature=panoptic_features)
        out = {"pred_logits": final["class_logits"], "pred_masks": final["mask_logits"],
               "pixel_feature": final["pixel_feature"]}
        if self.training:
            # only the losses read the per-layer predictions
            size = final["mask_logits"].shape[-2:]
            out["aux_outputs"] = [{"pred_logits": p["class_logits"],
                                   "pred_masks": resize_aligned(p["mask_logits"], size, size[0]),
                                   "pixel_feature": resize_aligned(p["pixel_feature"], size, size[0])}
                                  for p in predictions]
            if self._add_aux_semantic_pred:
                top, os8, os4 = semantic_features
                head = self._auxiliary_semantic_predictor
                out["aux_semantic_pred"] = head(top, os8, os4) if self._use_aux_semantic_decoder else head(top)
        return out
