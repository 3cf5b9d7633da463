"""Mask2Former's transformer decoder with masked cross-attention.

Each query attends only to pixels where its mask predicted by the previous layer is foreground
(sigmoid >= 0.5). Layers cycle over the three pixel-decoder scales, coarsest first.

Shapes: x: 3 maps (N, C_in, H_l, W_l); mask_features (N, mask_dim, H/4, W/4);
outputs pred_logits (N, Q, K+1), pred_masks (N, Q, H/4, W/4), aux_outputs: one dict per earlier
prediction (the learnable-query prediction first); empty in fast inference, which computes the
earlier masks only where the attention masks read them.
"""
import logging

import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...layers import (
    MLP,
    Conv2d,
    CrossAttentionLayer,
    FFNLayer,
    PositionEmbeddingSine,
    SelfAttentionLayer,
    c2_xavier_fill,
)
from ...utils.registry import TRANSFORMER_DECODER_REGISTRY
from .common import decoder_args_from_config

logger = logging.getLogger(__name__)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Keys: transformer_{self,cross}_attention_layers.{i}, transformer_ffn_layers.{i}, decoder_norm,
    query_feat, query_embed, level_embed, input_proj.{l} (only when C_in != hidden_dim),
    class_embed, mask_embed.layers.{0,1,2}."""

    _version = 2
    num_feature_levels = 3
    # False: inference computes every intermediate mask (the plain path that tests compare with)
    fast_inference = True

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, pre_norm: bool,
                 mask_dim: int, enforce_input_project: bool):
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        self.mask_classification = True
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, 0.0, normalize_before=pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1; got {mf.DEC_LAYERS}")
        # DEC_LAYERS counts the prediction made from the learnable queries themselves
        return {**decoder_args_from_config(cfg, in_channels, mask_classification), "dec_layers": mf.DEC_LAYERS - 1}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # checkpoints from before version 2 named the query features "static_query"
        if local_metadata.get("version", 2) < 2:
            for k in [k for k in state_dict if k.startswith(prefix) and "static_query" in k]:
                state_dict[k.replace("static_query", "query_feat")] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, x, mask_features, mask=None):
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))  # (HW, N, C)
        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        # Inference uses the intermediate masks only through the attention masks, i.e. at the
        # pixels that their bilinear downsampling reads; those are all it computes where they
        # are fewer than all pixels (no auxiliary outputs then).
        select = self.fast_inference and not self.training
        pixels = [attention_mask_pixels(mask_features, size) if select else None for size in sizes]

        logits, masks, attn_mask = self.prediction_heads(output, mask_features, sizes[0], pixels=pixels[0])
        all_logits, all_masks = [logits], [masks]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            nxt = (i + 1) % self.num_feature_levels
            if i + 1 < self.num_layers:
                logits, masks, attn_mask = self.prediction_heads(output, mask_features, sizes[nxt], pixels=pixels[nxt])
            else:
                # the last layer's attention mask would have no reader
                logits, masks, attn_mask = self.prediction_heads(output, mask_features, None)
            all_logits.append(logits)
            all_masks.append(masks)
        aux = [{"pred_logits": a, "pred_masks": b} for a, b in zip(all_logits[:-1], all_masks[:-1])]
        return {
            "pred_logits": all_logits[-1],
            "pred_masks": all_masks[-1],
            "aux_outputs": [] if any(m is None for m in all_masks) else aux,
        }

    def prediction_heads(self, output, mask_features, attn_mask_size, pixels=None):
        """output (Q, N, C) -> logits (N, Q, K+1), masks (N, Q, H/4, W/4) and the next layer's
        attention mask at ``attn_mask_size`` (h, w) (None: no attention mask), bool, True = not
        attended: (N*heads, Q, h*w), or (Q, h*w) when N = 1.

        ``pixels``: attention_mask_pixels(mask_features, attn_mask_size), or None. When given, the
        masks are computed at those pixels only and returned as None; the attention mask is the
        same (checked once per shape against the full computation)."""
        decoded = self.decoder_norm(output).transpose(0, 1)
        logits = self.class_embed(decoded)
        embed = self.mask_embed(decoded)
        if pixels is not None:
            key = (mask_features.device.type, mask_features.dtype, tuple(embed.shape), tuple(mask_features.shape),
                   tuple(attn_mask_size))
            if _SELECTION_EXACT.get(key):
                masks = torch.einsum("bqc,bchw->bqhw", embed, pixels)
                return logits, None, self._attention_mask(masks, attn_mask_size)
        masks = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        if attn_mask_size is None:
            return logits, masks, None
        attn = self._attention_mask(masks, attn_mask_size)
        if pixels is not None and key not in _SELECTION_EXACT:
            # The selection relies on the matrix product giving each pixel the same bits whatever
            # the other columns are, which BLAS libraries do not promise: verify it on this call.
            selected = self._attention_mask(torch.einsum("bqc,bchw->bqhw", embed, pixels), attn_mask_size)
            _SELECTION_EXACT[key] = torch.equal(selected, attn)
            if not _SELECTION_EXACT[key]:
                logger.info("attention masks from selected pixels differ for %s; computing all pixels", key)
        return logits, masks, attn

    def _attention_mask(self, masks, size):
        """Mask logits (N, Q, H', W') -> attention mask (see prediction_heads) at ``size``."""
        attn = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        # sigmoid() < 0.5 rather than x < 0: the two differ where sigmoid rounds to exactly 0.5
        attn = attn.sigmoid().flatten(2) < 0.5
        # a query whose mask is empty at this scale attends everywhere instead of nowhere
        attn[attn.all(-1)] = False
        if attn.shape[0] == 1:
            # one image: a (Q, h*w) mask, which attention broadcasts over the heads (same values
            # as the per-head copies, without building them)
            return attn[0].detach()
        return attn.unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1).detach()


# (device type, dtype, embedding shape, mask-feature shape, attention-mask size) -> whether masks
# computed at attention_mask_pixels() gave the full computation's attention mask
_SELECTION_EXACT = {}


def _read_factor(n_in: int, n_out: int):
    """The factor of bilinear resizing n_in -> n_out (align_corners=False) when each output index
    reads its own two inputs with weights 1/2 (factor*i + factor/2 - 1 and the next), i.e. n_in
    is an even multiple (>= 4) of n_out; else None."""
    if n_out <= 0 or n_in % n_out or (n_in // n_out) % 2 or n_in // n_out < 4:
        return None
    return n_in // n_out


def attention_mask_pixels(mask_features, size):
    """The pixels of mask_features (N, C, H, W) that bilinearly downsampling a map of that size to
    ``size`` (h, w) reads: (N, C, 2h, 2w), in which each output pixel reads its own 2x2 block with
    the same weights (1/2), so downsampling it to (h, w) gives the same values. None when the
    factors are not even integers >= 4 (then it saves nothing or does not apply)."""
    (n, c, hh, ww), (h, w) = mask_features.shape, size
    fy, fx = _read_factor(hh, h), _read_factor(ww, w)
    if fy is None or fx is None:
        return None
    blocks = mask_features.unflatten(3, (w, fx)).unflatten(2, (h, fy))  # (N, C, h, fy, w, fx)
    return blocks[:, :, :, fy // 2 - 1: fy // 2 + 1, :, fx // 2 - 1: fx // 2 + 1].reshape(n, c, 2 * h, 2 * w)
