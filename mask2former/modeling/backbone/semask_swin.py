"""SeMask Swin backbone (Jain et al., "SeMask: Semantically Masked Transformers", 2021): the Swin
Transformer of :mod:`.swin` with a *semantic layer* after the blocks of every stage, laid out like
the official ``D2SeMaskSwinTransformer`` (SeMask-Mask2Former) so its checkpoints load by name.
The keys are Swin's plus, per stage i:

    layers.{i}.semantic_layer.norm1.{weight,bias}                    LayerNorm(C_i)
    layers.{i}.semantic_layer.class_injection.{j}.mlp_cls_q / mlp_cls_k   Linear(C_i -> K)
    layers.{i}.semantic_layer.class_injection.{j}.mlp_v / mlp_res         Linear(C_i -> C_i)
    layers.{i}.semantic_layer.class_injection.{j}.gamma                   (1,) learnable scale

with K = MODEL.SEM_SEG_HEAD.NUM_CLASSES and j < MODEL.SWIN.NUM_SEM_BLOCKS.

A semantic layer normalises the stage's tokens, then each semantic-attention block computes
per-token class logits q = mlp_cls_q(x) and k = mlp_cls_k(x) (the semantic prior), attention
softmax(q k^T) over the tokens of a SEM_WINDOW_SIZE window, and x + gamma * mlp_res(attn mlp_v(x)).
The result replaces the stage output: it is both the feature map ``res{i+2}`` (after ``norm{i}``)
and the input of the next stage's patch merging. ``gamma`` and ``mlp_res`` start at zero, so at
initialisation a semantic layer computes LayerNorm(x): the stage output is normalised twice,
not passed through unchanged.

Windows: feature maps are zero-padded bottom/right to whole windows after the LayerNorm, and the
padded tokens take part in the attention (unmasked), as in the official code. The official code
also makes the last stage attend globally (over all H*W tokens) when NUM_CLASSES is 150 (its
ADE20K models) and keeps windows for any other class count (Cityscapes); ``global_stages``
carries that rule.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...layers import ShapeSpec
from ...utils.registry import BACKBONE_REGISTRY
from .swin import BasicLayer, D2SwinTransformer, whole_windows, window_partition, window_reverse

__all__ = ["SemanticAttention", "SemanticLayer", "SeMaskBasicLayer", "D2SeMaskSwinTransformer",
           "official_global_stages"]

# The class count for which the official SeMask code lets its last Swin stage attend globally.
_GLOBAL_LAST_STAGE_CLASSES = 150


def official_global_stages(num_classes: int, num_stages: int = 4) -> Tuple[int, ...]:
    """Stages whose semantic layer attends over the whole map in the official code: stage 3 and
    later when NUM_CLASSES is 150, none otherwise."""
    return tuple(range(3, num_stages)) if num_classes == _GLOBAL_LAST_STAGE_CLASSES else ()


class SemanticAttention(nn.Module):
    """One semantic-attention block (keys mlp_cls_q, mlp_cls_k, mlp_v, mlp_res, gamma).

    forward: x (B', N, C) -> (class logits q (B', N, K), x + gamma * dropout(mlp_res(softmax(q k^T) v))).
    The logits are not scaled before the softmax (as in the official code)."""

    def __init__(self, dim: int, num_classes: int, proj_drop: float = 0.1):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gamma = nn.Parameter(torch.zeros(1))
        for layer in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        # zero residual branch: the block starts as the identity on its (normalised) input
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q = self.mlp_cls_q(x)
        k = self.mlp_cls_k(x)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B', N, N)
        update = self.proj_drop(self.mlp_res(attn @ self.mlp_v(x)))
        return q, x + self.gamma * update


class SemanticLayer(nn.Module):
    """LayerNorm then ``num_sem_blocks`` semantic-attention blocks, in windows of ``window_size``
    tokens or over the whole map (``window_size=None``). Keys: norm1, class_injection.{j}.

    forward: x (B, H*W, C), H, W -> (prior logits of the last block (B, H*W, K), x (B, H*W, C))."""

    def __init__(self, dim: int, num_classes: int, window_size: Optional[int], num_sem_blocks: int = 1,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        if num_sem_blocks < 1:
            raise ValueError(f"a semantic layer needs at least one block; got num_sem_blocks={num_sem_blocks}")
        self.dim, self.num_classes, self.window_size = dim, num_classes, window_size
        self.norm1 = norm_layer(dim)
        self.class_injection = nn.ModuleList(SemanticAttention(dim, num_classes) for _ in range(num_sem_blocks))

    def _blocks(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        prior = None
        for blk in self.class_injection:
            prior, x = blk(x)
        return prior, x

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"token count {L} != H*W = {H}*{W}")
        x = self.norm1(x)
        ws = self.window_size
        if ws is None:
            return self._blocks(x)
        x = x.view(B, H, W, C)
        # zero-pad the normalised tokens to whole windows; the padding is attended to, unmasked
        Hp, Wp = whole_windows(H, ws), whole_windows(W, ws)
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        prior, x = self._blocks(window_partition(x, ws).view(-1, ws * ws, C))
        x = window_reverse(x.view(-1, ws, ws, C), ws, Hp, Wp)[:, :H, :W]
        prior = window_reverse(prior.view(-1, ws, ws, self.num_classes), ws, Hp, Wp)[:, :H, :W]
        return prior.reshape(B, H * W, self.num_classes), x.reshape(B, H * W, C)


class SeMaskBasicLayer(BasicLayer):
    """A Swin stage whose block output goes through a :class:`SemanticLayer` before it is the
    stage output and the input of patch merging.

    forward: x (B, H*W, C), H, W -> (stage output, downsampled tokens, Hd, Wd, prior logits (B, K, H, W))."""

    def __init__(self, *, num_classes: int, sem_window_size: Optional[int], num_sem_blocks: int, **kwargs):
        super().__init__(**kwargs)
        self.semantic_layer = SemanticLayer(kwargs["dim"], num_classes, sem_window_size, num_sem_blocks,
                                            norm_layer=kwargs.get("norm_layer", nn.LayerNorm))

    def forward(self, x: torch.Tensor, H: int, W: int):
        prior, x = self.semantic_layer(self.forward_blocks(x, H, W), H, W)
        prior = prior.view(-1, H, W, prior.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return (x, *self.downsample_tokens(x, H, W), prior)


@BACKBONE_REGISTRY.register()
class D2SeMaskSwinTransformer(D2SwinTransformer):
    """SeMask Swin. ``forward(x)`` returns the features of :class:`D2SwinTransformer`
    (``{"res2": (N, D, H/4, W/4), ...}``); ``forward_with_priors(x)`` also returns the semantic
    prior logits of each returned stage, ``{"res2": (N, K, H/4, W/4), ...}``, which SeMask's
    meta architecture supervises. Config: MODEL.SWIN (as Swin) plus SEM_WINDOW_SIZE and
    NUM_SEM_BLOCKS, and K = MODEL.SEM_SEG_HEAD.NUM_CLASSES."""

    @configurable
    def __init__(self, *, num_classes: int, sem_window_size: int = 7, num_sem_blocks: int = 1,
                 global_stages: Optional[Sequence[int]] = None, **swin_kwargs):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be a positive int for SeMask's semantic layers; "
                             f"got {num_classes!r}")
        if not isinstance(sem_window_size, int) or sem_window_size < 1:
            raise ValueError(f"MODEL.SWIN.SEM_WINDOW_SIZE must be a positive int; got {sem_window_size!r}")
        if not isinstance(num_sem_blocks, int) or num_sem_blocks < 1:
            raise ValueError(f"MODEL.SWIN.NUM_SEM_BLOCKS must be an int >= 1 for D2SeMaskSwinTransformer (its "
                             f"stages return semantic priors); got {num_sem_blocks!r}. Use D2SwinTransformer for "
                             "a Swin without semantic layers")
        num_stages = len(swin_kwargs.get("depths", (2, 2, 6, 2)))
        if global_stages is None:
            global_stages = official_global_stages(num_classes, num_stages)
        bad = [s for s in global_stages if not 0 <= s < num_stages]
        if bad:
            raise ValueError(f"global_stages {list(global_stages)}: stages {bad} do not exist (0..{num_stages - 1})")
        # read by build_stage while the base class builds the stages
        self._semantic = dict(num_classes=num_classes, sem_window_size=sem_window_size,
                              num_sem_blocks=num_sem_blocks, global_stages=tuple(global_stages))
        super().__init__(**swin_kwargs)
        self.num_classes = num_classes

    def build_stage(self, i: int, **kwargs) -> nn.Module:
        s = self._semantic
        window = None if i in s["global_stages"] else s["sem_window_size"]
        return SeMaskBasicLayer(num_classes=s["num_classes"], sem_window_size=window,
                                num_sem_blocks=s["num_sem_blocks"], **kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        ret = D2SwinTransformer.from_config(cfg, input_shape)
        ret.update(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, sem_window_size=cfg.MODEL.SWIN.SEM_WINDOW_SIZE,
                   num_sem_blocks=cfg.MODEL.SWIN.NUM_SEM_BLOCKS)
        return ret

    def forward_with_priors(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """x: (N, C, H, W) -> (features by name, semantic prior logits by the same names)."""
        return self.forward_stages(x)
