"""MaskFormer (v1) transformer decoder: a DETR encoder-decoder over one feature map.

Shapes: x (N, C_in, h, w); mask_features (N, mask_dim, H/4, W/4); outputs pred_logits (N, Q, K+1),
pred_masks (N, Q, H/4, W/4), and with deep supervision aux_outputs for every earlier layer.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...layers import MLP, Conv2d, PositionEmbeddingSine, TransformerDecoderLayer, TransformerEncoderLayer, c2_xavier_fill, clones
from ...utils.registry import TRANSFORMER_DECODER_REGISTRY
from .common import decoder_args_from_config


class Transformer(nn.Module):
    """Keys: encoder.layers.{i}, encoder.norm (pre-norm only), decoder.layers.{i}, decoder.norm."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation="relu", normalize_before=False, return_intermediate_dec=False):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = clones(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before),
            num_encoder_layers)
        self.encoder.norm = nn.LayerNorm(d_model) if normalize_before else None
        self.decoder = nn.Module()
        self.decoder.layers = clones(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before),
            num_decoder_layers)
        self.decoder.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate_dec
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        """src, pos_embed (N, C, h, w); mask (N, h, w) bool or None; query_embed (Q, C).
        Returns hs (layers, N, Q, C): decoder outputs after the final norm (all layers when
        return_intermediate, else the last only)."""
        n = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, n, 1)
        key_padding = mask.flatten(1) if mask is not None else None
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, src_key_padding_mask=key_padding, pos=pos)
        if self.encoder.norm is not None:
            memory = self.encoder.norm(memory)
        out = torch.zeros_like(query_pos)
        intermediate = []
        for layer in self.decoder.layers:
            out = layer(out, memory, memory_key_padding_mask=key_padding, pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.decoder.norm(out))
        hs = torch.stack(intermediate) if self.return_intermediate else self.decoder.norm(out).unsqueeze(0)
        return hs.transpose(1, 2)


@TRANSFORMER_DECODER_REGISTRY.register()
class StandardTransformerDecoder(nn.Module):
    """Keys: transformer.*, query_embed, input_proj (only when C_in != hidden_dim), class_embed,
    mask_embed.layers.{0,1,2}."""

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dropout: float, dim_feedforward: int, enc_layers: int,
                 dec_layers: int, pre_norm: bool, deep_supervision: bool, mask_dim: int,
                 enforce_input_project: bool):
        super().__init__()
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout,
                                       normalize_before=pre_norm, return_intermediate_dec=deep_supervision)
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.aux_loss = deep_supervision
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        return {
            **decoder_args_from_config(cfg, in_channels, mask_classification),
            "dropout": mf.DROPOUT,
            "enc_layers": mf.ENC_LAYERS,
            "dec_layers": mf.DEC_LAYERS,
            "deep_supervision": mf.DEEP_SUPERVISION,
        }

    def forward(self, x, mask_features, mask=None):
        if mask is not None:
            mask = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        hs = self.transformer(self.input_proj(x), mask, self.query_embed.weight, self.pe_layer(x, mask))
        out = {}
        logits = self.class_embed(hs) if self.mask_classification else None
        if logits is not None:
            out["pred_logits"] = logits[-1]
        if self.aux_loss:
            masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
            out["pred_masks"] = masks[-1]
            out["aux_outputs"] = [
                ({"pred_logits": logits[i]} if logits is not None else {}) | {"pred_masks": masks[i]}
                for i in range(len(masks) - 1)
            ]
        else:
            out["pred_masks"] = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hs[-1]), mask_features)
        return out
