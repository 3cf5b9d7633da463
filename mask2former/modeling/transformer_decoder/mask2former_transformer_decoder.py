"""Mask2Former's transformer decoder with masked cross-attention.

Each query attends only to pixels where its mask predicted by the previous layer is foreground
(sigmoid >= 0.5). Layers cycle over the three pixel-decoder scales, coarsest first.

Shapes: x: 3 maps (N, C_in, H_l, W_l); mask_features (N, mask_dim, H/4, W/4);
outputs pred_logits (N, Q, K+1), pred_masks (N, Q, H/4, W/4), aux_outputs: one dict per earlier
prediction (the learnable-query prediction first).
"""
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


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Keys: transformer_{self,cross}_attention_layers.{i}, transformer_ffn_layers.{i}, decoder_norm,
    query_feat, query_embed, level_embed, input_proj.{l} (only when C_in != hidden_dim),
    class_embed, mask_embed.layers.{0,1,2}."""

    _version = 2
    num_feature_levels = 3

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
        src, pos, sizes = self.memory(x)
        bs = src[0].shape[1]
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        return self.output_dict(self.decode(output, self.query_positions(bs), src, pos, sizes, mask_features))

    def memory(self, x):
        """The three feature maps -> per level: projected features + level embedding (HW, N, C),
        their sine positions (HW, N, C), and their sizes (h, w)."""
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))  # (HW, N, C)
        return src, pos, sizes

    def query_positions(self, bs):
        """The learnable query positions (Q, N, C) added to queries in attention."""
        return self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)

    def decode(self, output, query_pos, src, pos, sizes, mask_features, self_attn_mask=None, pilot=None):
        """Run the layers from the queries ``output`` (L, N, C); returns every prediction
        [(logits, masks, next attention mask)]. ``self_attn_mask`` (L, L) bool restricts
        self-attention; ``pilot(j, attn_mask)`` may rewrite the attention mask that layer j reads."""
        predictions = [self.prediction_heads(output, mask_features, sizes[0])]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = predictions[-1][2] if pilot is None else pilot(i, predictions[-1][2])
            output = self.transformer_cross_attention_layers[i](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_pos)
            output = self.transformer_self_attention_layers[i](output, tgt_mask=self_attn_mask, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            # the last layer's attention mask would have no reader
            size = sizes[(i + 1) % self.num_feature_levels] if i + 1 < self.num_layers else None
            predictions.append(self.prediction_heads(output, mask_features, size))
        return predictions

    def output_dict(self, predictions):
        """[(logits, masks, attention mask)] of every prediction, in order -> the decoder's outputs."""
        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": logits, "pred_masks": masks} for logits, masks, _ in predictions[:-1]],
        }

    def class_and_mask_embed(self, output):
        """output (Q, N, C) -> class logits (N, Q, K+1) and mask embeddings (N, Q, mask_dim)."""
        decoded = self.decoder_norm(output).transpose(0, 1)
        return self.class_embed(decoded), self.mask_embed(decoded)

    def prediction_heads(self, output, mask_features, attn_mask_size):
        """output (Q, N, C) -> logits (N, Q, K+1), masks (N, Q, H/4, W/4) and the next layer's
        attention mask at ``attn_mask_size`` (h, w) (None: no attention mask)."""
        logits, embed = self.class_and_mask_embed(output)
        masks = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        if attn_mask_size is None:
            return logits, masks, None
        return logits, masks, self.attention_mask(masks, attn_mask_size)

    def attention_mask(self, masks, size):
        """Mask logits (N, Q, H', W') -> the heads' attention masks, bool (N*heads, Q, h*w)."""
        return self.query_attention_mask(masks, size).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)

    @staticmethod
    def query_attention_mask(masks, size):
        """Mask logits (N, Q, H', W') -> bool (N, Q, h*w) at ``size`` (h, w), True = not attended:
        the pixels where the mask, bilinearly resized, has sigmoid < 0.5."""
        attn = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        # sigmoid() < 0.5 rather than x < 0: the two differ where sigmoid rounds to exactly 0.5
        attn = attn.sigmoid().flatten(2) < 0.5
        # a query whose mask is empty at this scale attends everywhere instead of nowhere
        attn[attn.all(-1)] = False
        return attn.detach()
