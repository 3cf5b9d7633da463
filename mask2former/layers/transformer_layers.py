"""Transformer blocks shared by the Mask2Former and MaskFormer decoders.

Sequences are (length, N, C) as in ``nn.MultiheadAttention(batch_first=False)``, which keeps the
official parameter names (``in_proj_weight``, ``out_proj.*``). Each sub-block is a residual
branch with LayerNorm after it (post-norm) or before it (pre-norm, ``normalize_before``).
The three functions below hold the computation once; the module classes only differ in how
their parameters are named.
"""
import copy
from typing import Optional

from torch import Tensor, nn
from torch.nn import functional as F


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _relu_inplace(x: Tensor) -> Tensor:
    # the FFN's hidden tensor is fresh and nothing else reads it: saves one allocation per layer
    return F.relu(x, inplace=True)


def _activation(name: str):
    if name == "relu":
        return _relu_inplace
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation must be 'relu', 'gelu' or 'glu'; got {name!r}")


def attention_block(attn: nn.MultiheadAttention, norm: nn.LayerNorm, dropout: nn.Module, tgt: Tensor,
                    memory: Optional[Tensor], *, pos: Optional[Tensor] = None,
                    query_pos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                    key_padding_mask: Optional[Tensor] = None, pre_norm: bool = False) -> Tensor:
    """Residual attention from ``tgt`` (Lq, N, C) to ``memory`` (Lk, N, C), or to itself when
    ``memory`` is None. Positions are added to queries/keys, never to values.
    attn_mask: (N*heads, Lq, Lk) or (Lq, Lk) bool, True = not attended."""
    x = norm(tgt) if pre_norm else tgt
    if memory is None:
        q = k = _with_pos(x, query_pos)
        v = x
    else:
        q, k, v = _with_pos(x, query_pos), _with_pos(memory, pos), memory
    out = attn(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
    tgt = tgt + dropout(out)
    return tgt if pre_norm else norm(tgt)


def ffn_block(linear1: nn.Linear, linear2: nn.Linear, norm: nn.LayerNorm, dropout_inner: nn.Module,
              dropout_out: nn.Module, activation, tgt: Tensor, pre_norm: bool = False) -> Tensor:
    """tgt (..., C) -> (..., C): ``tgt + linear2(activation(linear1(tgt)))`` with the norm after
    (post-norm) or before (pre-norm). ``linear1`` may be any callable of the same contract."""
    x = norm(tgt) if pre_norm else tgt
    tgt = tgt + dropout_out(linear2(dropout_inner(activation(linear1(x)))))
    return tgt if pre_norm else norm(tgt)


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Keys: self_attn.*, norm.*"""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        return attention_block(self.self_attn, self.norm, self.dropout, tgt, None, query_pos=query_pos,
                               attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                               pre_norm=self.normalize_before)


class CrossAttentionLayer(nn.Module):
    """Keys: multihead_attn.*, norm.*"""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None):
        return attention_block(self.multihead_attn, self.norm, self.dropout, tgt, memory, pos=pos,
                               query_pos=query_pos, attn_mask=memory_mask,
                               key_padding_mask=memory_key_padding_mask, pre_norm=self.normalize_before)


class FFNLayer(nn.Module):
    """Keys: linear1.*, linear2.*, norm.*"""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt):
        return ffn_block(self.linear1, self.linear2, self.norm, self.dropout, self.dropout, self.activation,
                         tgt, self.normalize_before)


class TransformerEncoderLayer(nn.Module):
    """DETR encoder layer. Keys: self_attn.*, linear1/2.*, norm1/2.*"""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        src = attention_block(self.self_attn, self.norm1, self.dropout1, src, None, query_pos=pos,
                              attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                              pre_norm=self.normalize_before)
        return ffn_block(self.linear1, self.linear2, self.norm2, self.dropout, self.dropout2, self.activation,
                         src, self.normalize_before)


class TransformerDecoderLayer(nn.Module):
    """DETR decoder layer. Keys: self_attn.*, multihead_attn.*, linear1/2.*, norm1/2/3.*"""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None):
        pre = self.normalize_before
        tgt = attention_block(self.self_attn, self.norm1, self.dropout1, tgt, None, query_pos=query_pos,
                              attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, pre_norm=pre)
        tgt = attention_block(self.multihead_attn, self.norm2, self.dropout2, tgt, memory, pos=pos,
                              query_pos=query_pos, attn_mask=memory_mask,
                              key_padding_mask=memory_key_padding_mask, pre_norm=pre)
        return ffn_block(self.linear1, self.linear2, self.norm3, self.dropout, self.dropout3, self.activation,
                         tgt, pre)


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))
