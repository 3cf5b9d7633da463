"""Sine position encoding over a 2-D feature map (DETR style)."""
import math
from typing import Optional

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Encode (y, x) pixel positions as sin/cos features.

    forward(x (N, C, H, W), mask (N, H, W) bool, True = padding) -> (N, 2*num_pos_feats, H, W).
    The first num_pos_feats channels encode y, the rest x; within each half, channels alternate
    sin/cos of the position divided by temperature ** (2 * (i // 2) / num_pos_feats).
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            mask = torch.zeros((x.shape[0], *x.shape[-2:]), device=x.device, dtype=torch.bool)
        return self._encode(mask)

    def _encode(self, mask: torch.Tensor) -> torch.Tensor:
        valid = ~mask
        y_pos = valid.cumsum(1, dtype=torch.float32)
        x_pos = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_pos = y_pos / (y_pos[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)

        def encode(p):
            p = p[..., None] / freq
            return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).flatten(3)

        return torch.cat((encode(y_pos), encode(x_pos)), dim=3).permute(0, 3, 1, 2)
