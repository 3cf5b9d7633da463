"""Swin Transformer backbone (Liu et al., ICCV 2021) laid out like Mask2Former's
``D2SwinTransformer`` so its checkpoints load by name:

    patch_embed.{proj,norm}, absolute_pos_embed (APE only),
    layers.{i}.blocks.{j}.{norm1, attn.{relative_position_bias_table, relative_position_index,
    qkv, proj}, norm2, mlp.{fc1, fc2}}, layers.{i}.downsample.{norm, reduction} (i < last),
    norm{i} (one LayerNorm per stage output).

Numerics follow the segmentation variant of Swin: inputs of any size are zero-padded (bottom/right)
to the patch size, every block pads its normalised tokens to a multiple of the window size (the
padded tokens take part in attention), shifted windows use a -100 additive mask, and patch merging
pads odd sizes and concatenates (even row, even col), (odd, even), (even, odd), (odd, odd).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_

from ...config.configurable import configurable
from ...layers import ShapeSpec
from ...utils.registry import BACKBONE_REGISTRY
from .backbone import Backbone

__all__ = ["WindowAttention", "SwinTransformerBlock", "PatchMerging", "BasicLayer", "PatchEmbed",
           "D2SwinTransformer", "window_partition", "window_reverse"]


def whole_windows(size: int, ws: int) -> int:
    """``size`` rounded up to a multiple of ``ws``, in integer arithmetic: under torch.export a
    float ceil or nested modulos of a symbolic size make its shape reasoning take minutes."""
    return (size + ws - 1) // ws * ws


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ws -> (B * H/ws * W/ws, ws, ws, C), windows row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def relative_position_index(window_size) -> torch.Tensor:
    """(Wh*Ww, Wh*Ww) int64 index into the (2Wh-1)*(2Ww-1) bias table for each token pair (i, j):
    (dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1) with (dy, dx) = pos(i) - pos(j)."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shifted_window_mask(Hp: int, Wp: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask (0 or -100) for attention in cyclically shifted windows of a
    (Hp, Wp) map: tokens from different regions of the rolled map must not attend to each other.
    Along each axis the regions are the bands [0, n - ws), [n - ws, n - shift), [n - shift, n); a
    token's region is 3 * (row band) + (column band), computed by comparison rather than by slice
    assignment (the first band is empty for a one-window map, a case a traced slice would fix)."""

    def bands(n):
        i = torch.arange(n, device=device)
        return (i >= n - ws).float() + (i >= n - shift).float()

    img = (bands(Hp)[:, None] * 3 + bands(Wp)[None, :])[None, :, :, None]
    labels = window_partition(img, ws).view(-1, ws * ws)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative position bias.

    forward: x (B*nW, N=Wh*Ww, C), mask (nW, N, N) or None -> (B*nW, N, C).
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        # `or` as in the reference: a QK_SCALE of None (or 0) means head_dim ** -0.5.
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        # Persistent: the official checkpoints contain it.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B_, nH, N, N
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, both pre-norm residual. forward: x (B, H*W, C) -> same."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size}, {window_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, H: int, W: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"token count {L} != H*W = {H}*{W}")
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        # Zero-pad the *normalised* tokens bottom/right to whole windows (as the reference does).
        Hp, Wp = whole_windows(H, ws), whole_windows(W, ws)
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, C)
        windows = self.attn(windows, mask=attn_mask if shift > 0 else None)
        x = window_reverse(windows.view(-1, ws, ws, C), ws, Hp, Wp)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W, :].reshape(B, H * W, C)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm(4C) + Linear(4C -> 2C, no bias).

    forward: x (B, H*W, C), H, W -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"token count {L} != H*W = {H}*{W}")
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # Order matters for checkpoint compatibility: rows (0,1,0,1) x cols (0,0,1,1).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain / shifted windows, then optional PatchMerging.

    forward: x (B, H*W, C), H, W -> (stage output (B, H*W, C), downsampled tokens, Hd, Wd).
    """

    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm,
                 downsample=None, use_checkpoint=False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size=window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                                 drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        )
        self.downsample = downsample(dim=dim, norm_layer=norm_layer) if downsample is not None else None

    def forward_blocks(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The stage's transformer blocks: (B, H*W, C) -> (B, H*W, C)."""
        ws = self.window_size
        Hp, Wp = whole_windows(H, ws), whole_windows(W, ws)
        attn_mask = shifted_window_mask(Hp, Wp, ws, self.shift_size, device=x.device)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, H, W, attn_mask, use_reentrant=False)
            else:
                x = blk(x, H, W, attn_mask)
        return x

    def downsample_tokens(self, x: torch.Tensor, H: int, W: int):
        """The next stage's input: (tokens, H', W') after patch merging (the same tokens at the last stage)."""
        if self.downsample is None:
            return x, H, W
        return self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2

    def forward(self, x: torch.Tensor, H: int, W: int):
        x = self.forward_blocks(x, H, W)
        return (x, *self.downsample_tokens(x, H, W))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection. forward: (B, C, H, W) -> (B, D, ceil(H/p), ceil(W/p));
    the input is zero-padded on the right/bottom to a multiple of the patch size."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch_size
        H, W = x.shape[-2:]
        if H % ph or W % pw:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        x = self.proj(x)
        if self.norm is not None:
            Wh, Ww = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, self.embed_dim, Wh, Ww)
        return x


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """Swin Transformer returning ``{"res2": (N, D, H/4, W/4), ..., "res5": (N, 8D, H/32, W/32)}``
    (sizes rounded up), D = ``embed_dim``, channels ``D * 2**i`` for stage i.

    Build from a config (``D2SwinTransformer(cfg, input_shape)``, reading ``cfg.MODEL.SWIN``) or with
    keyword arguments. A LayerNorm ``norm{i}`` exists for every stage (the official model always
    uses out_indices (0, 1, 2, 3)), whatever ``out_features`` selects.
    """

    @configurable
    def __init__(self, *, pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2,
                 norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5"), use_checkpoint=False):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"DEPTHS {depths} and NUM_HEADS {num_heads} differ in length")
        self.pretrain_img_size = pretrain_img_size
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        if ape:
            res = [s // p for s, p in zip(to_2tuple(pretrain_img_size), to_2tuple(patch_size))]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, res[0], res[1]))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks.
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.num_features = [int(embed_dim * 2**i) for i in range(self.num_layers)]
        self.layers = nn.ModuleList(
            self.build_stage(i, dim=self.num_features[i], depth=depths[i], num_heads=num_heads[i],
                             window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                             drop=drop_rate, attn_drop=attn_drop_rate,
                             drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                             downsample=PatchMerging if i < self.num_layers - 1 else None,
                             use_checkpoint=use_checkpoint)
            for i in range(self.num_layers)
        )
        for i, ch in enumerate(self.num_features):
            self.add_module(f"norm{i}", norm_layer(ch))

        names = [f"res{i + 2}" for i in range(self.num_layers)]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(f"Unsupported Swin OUT_FEATURES {list(out_features)}; choose from {names}")
        self._out_features = list(out_features)
        self._out_feature_strides = {n: patch_size * 2**i for i, n in enumerate(names)}
        self._out_feature_channels = dict(zip(names, self.num_features))

    def build_stage(self, i: int, **kwargs) -> nn.Module:
        """Stage ``i`` (``layers.{i}``) from BasicLayer's keyword arguments; variants (SeMask) override it."""
        return BasicLayer(**kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        s = cfg.MODEL.SWIN
        return dict(
            pretrain_img_size=s.PRETRAIN_IMG_SIZE, patch_size=s.PATCH_SIZE,
            in_chans=(input_shape.channels if input_shape is not None and input_shape.channels else 3),
            embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS, window_size=s.WINDOW_SIZE,
            mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS, qk_scale=s.QK_SCALE, drop_rate=s.DROP_RATE,
            attn_drop_rate=s.ATTN_DROP_RATE, drop_path_rate=s.DROP_PATH_RATE, ape=s.APE,
            patch_norm=s.PATCH_NORM, out_features=s.OUT_FEATURES, use_checkpoint=s.USE_CHECKPOINT,
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (N, C, H, W) -> {res_k: (N, C_k, H_k, W_k)} for the requested out_features."""
        return self.forward_stages(x)[0]

    def forward_stages(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(features, extras): the features of :meth:`forward`, and by the same names whatever a
        stage returns after its usual four values (SeMask's semantic-prior logits); {} for Swin."""
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer takes an input of shape (N, C, H, W); got {tuple(x.shape)}")
        x = self.patch_embed(x)
        Wh, Ww = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(Wh, Ww), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs, extras = {}, {}
        H, W = Wh, Ww
        last = max(int(name[3:]) - 2 for name in self._out_features)
        for i in range(last + 1):  # later stages cannot affect the requested outputs
            x_out, x, H_next, W_next, *extra = self.layers[i](x, H, W)
            name = f"res{i + 2}"
            if name in self._out_features:
                y = getattr(self, f"norm{i}")(x_out)
                outs[name] = y.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
                if extra:
                    extras[name] = extra[0]
            H, W = H_next, W_next
        return outs, extras

    @property
    def size_divisibility(self) -> int:
        return 32
