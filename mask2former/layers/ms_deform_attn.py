"""Multi-scale deformable attention module (the learnable part around the op)."""
import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import ms_deform_attn, sampling_locations_from_offsets


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level, around its
    reference point, with offsets and weights predicted from the query.

    Keys: sampling_offsets.*, attention_weights.*, value_proj.*, output_proj.*
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1):
            warnings.warn(f"MSDeformAttn: head dim {head_dim} is not a power of 2; kernels are slower")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # Offsets start at zero weight with a bias that spreads each head's points along its own
        # direction (head h at angle 2*pi*h/M), at distances 1..P.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = dirs.view(self.n_heads, 1, 1, 2) * scale
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_in, spatial_shapes, level_start_index, padding_mask=None):
        """query (N, Lq, C); reference_points (N, Lq, L, 2) normalised (x, y);
        value_in (N, S, C); spatial_shapes (L, 2) (H, W), or L (H, W) pairs (``level_start_index``
        then None; see ``mask2former.ops.ms_deform_attn``); level_start_index (L,);
        padding_mask (N, S) bool, True = padding. Returns (N, Lq, C)."""
        n, lq, _ = query.shape
        s = value_in.shape[1]
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] != 2:
            raise ValueError(f"reference_points must end in (x, y); got shape {tuple(reference_points.shape)}")
        out = self.sample(value, spatial_shapes, level_start_index, reference_points, offsets, weights)
        return self.output_proj(out)

    def sample(self, value, spatial_shapes, level_start_index, reference_points, offsets, weights):
        """The attention-weighted sum of ``value`` (N, S, M, D) at the sampling locations
        ``reference_points`` (N, Lq, L, 2) + ``offsets`` (N, Lq, M, L, P, 2) / (W, H) of each
        level (offsets are in pixels of their level); weights (N, Lq, M, L, P). Returns (N, Lq, M*D)."""
        locations = sampling_locations_from_offsets(reference_points, offsets, spatial_shapes)
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
