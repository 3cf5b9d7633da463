"""Point sampling of dense maps (PointRend style), used by the matcher and the mask losses.

Coordinates are normalised to the unit square: (x, y) with (0, 0) the top-left corner of the
top-left pixel and (1, 1) the bottom-right corner of the bottom-right pixel, so the same
coordinates address a low-resolution mask prediction and a full-resolution ground-truth mask
alike (grid_sample with ``align_corners=False``).

Shape legend:
    N: number of maps sampled independently (masks, or images)
    C: channels of a map (1 for a mask)
    H, W: height and width of a map
    P: number of points per map
"""
from typing import Callable

import torch
from torch.nn import functional as F

__all__ = ["point_sample", "get_uncertain_point_coords_with_randomness", "calculate_uncertainty"]


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinearly read ``input`` (N, C, H, W) at ``point_coords`` (N, P, 2), (x, y) in [0, 1]^2.

    Returns (N, C, P). Extra keyword arguments go to ``F.grid_sample``; ``align_corners``
    defaults to False (pixel centres at (i + 0.5) / W), points outside the map read zeros.
    A 4-d ``point_coords`` (N, Hg, Wg, 2) is passed through and gives (N, C, Hg, Wg).
    """
    kwargs.setdefault("align_corners", False)
    if point_coords.dim() == 3:
        grid = (point_coords * 2.0 - 1.0).unsqueeze(2)  # (N, P, 1, 2)
        return F.grid_sample(input, grid.to(input.dtype), **kwargs).squeeze(3)
    if point_coords.dim() == 4:
        return F.grid_sample(input, (point_coords * 2.0 - 1.0).to(input.dtype), **kwargs)
    raise ValueError(f"point_coords must be (N, P, 2) or (N, Hg, Wg, 2); got {tuple(point_coords.shape)}")


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits (N, 1, ...): -|logit|, highest (0) on the
    decision boundary."""
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects one channel (N, 1, ...); got {tuple(logits.shape)}")
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
        coarse_logits: torch.Tensor, uncertainty_func: Callable[[torch.Tensor], torch.Tensor], num_points: int,
        oversample_ratio: float, importance_sample_ratio: float) -> torch.Tensor:
    """Choose ``num_points`` points per map of ``coarse_logits`` (N, C, H, W), biased towards
    uncertain regions (PointRend's training-time sampling).

    ``int(num_points * oversample_ratio)`` candidates are drawn uniformly in [0, 1]^2 and their
    logits interpolated; the ``int(importance_sample_ratio * num_points)`` candidates with the
    highest ``uncertainty_func`` ((N, C, P) -> (N, 1, P)) are kept — uncertainty is computed on
    the interpolated values, not interpolated from per-pixel uncertainties — and the remainder is
    filled with fresh uniform points. Returns (N, num_points, 2) (x, y) coordinates.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1; got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1]; got {importance_sample_ratio}")
    n = coarse_logits.shape[0]
    device = coarse_logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = torch.rand(n, num_candidates, 2, device=device)
    uncertainty = uncertainty_func(point_sample(coarse_logits, candidates))[:, 0, :]  # (N, P_candidates)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    chosen = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=device)], dim=1)
    return chosen
