"""Hungarian matching of predicted queries to ground-truth segments.

Per image, a (Q, T) cost matrix is built from
    cost_class * (-p_q(class of t))                      softmax over the K+1 logits
  + cost_mask  * mean over points of BCE(sigmoid(m_q), g_t)
  + cost_dice  * (1 - (2 sum(s_q g_t) + 1) / (sum s_q + sum g_t + 1)),  s_q = sigmoid(m_q)
where the mask terms are evaluated on ``num_points`` points drawn uniformly in [0, 1]^2, one set
per image shared by every prediction and target (predictions are read from the low-resolution
mask logits, targets from the padded ground-truth masks, both by bilinear point sampling), and
the one-to-one assignment of minimum total cost is found with
``scipy.optimize.linear_sum_assignment``. Queries left unassigned are "no object".
"""
from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from ..layers.point_features import point_sample

__all__ = ["HungarianMatcher", "pairwise_sigmoid_ce", "pairwise_dice"]


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    logits (Q, P), targets (T, P) in [0, 1] -> (Q, T).
    BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x), averaged over the P points.
    """
    p = logits.shape[1]
    loss_if_one = F.softplus(-logits)   # BCE against target 1
    loss_if_zero = F.softplus(logits)   # BCE against target 0
    return (loss_if_one @ targets.T + loss_if_zero @ (1 - targets).T) / p


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss (with +1 smoothing) of every prediction against every target.

    logits (Q, P), targets (T, P) in [0, 1] -> (Q, T).
    """
    probs = logits.sigmoid()
    inter = probs @ targets.T
    total = probs.sum(1)[:, None] + targets.sum(1)[None, :]
    return 1 - (2 * inter + 1) / (total + 1)


class HungarianMatcher(nn.Module):
    """Assign each ground-truth segment to one query (requires Q >= T per image).

    ``forward(outputs, targets)``: outputs has "pred_logits" (N, Q, K+1) and "pred_masks"
    (N, Q, h, w) logits; targets is a list of N dicts with "labels" int64 (T_i,) and "masks"
    (T_i, H, W) (bool or float, padded like the image batch). Returns N pairs
    (query indices, target indices), int64 CPU tensors of length T_i, sorted by query index.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be positive; got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def sample_points(self, device: torch.device) -> torch.Tensor:
        """The (num_points, 2) points of one image, uniform in [0, 1]^2."""
        return torch.rand(self.num_points, 2, device=device)

    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    tgt_masks: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
        """(Q, T) matching cost of one image. logits (Q, K+1), masks (Q, h, w), labels (T,),
        tgt_masks (T, H, W), point_coords (P, 2) in [0, 1]^2, all float32 (masks may be bool)."""
        prob = logits.float().softmax(-1)
        cost_class = -prob[:, labels]
        q, t = masks.shape[0], tgt_masks.shape[0]
        pred_pts = point_sample(masks[:, None].float(), point_coords[None].expand(q, -1, -1))[:, 0]
        tgt_pts = point_sample(tgt_masks[:, None].float(), point_coords[None].expand(t, -1, -1))[:, 0]
        cost_mask = pairwise_sigmoid_ce(pred_pts, tgt_pts)
        cost_dice = pairwise_dice(pred_pts, tgt_pts)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor],
                targets: Sequence[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {pred_logits.shape[0]} images in outputs but {len(targets)} targets")
        num_queries = pred_logits.shape[1]
        device = pred_masks.device
        indices = []
        # costs in float32 whatever the autocast state (mixed precision would blur close costs)
        with torch.autocast(device_type=device.type, enabled=False):
            for b, tgt in enumerate(targets):
                labels = tgt["labels"]
                num_targets = int(labels.shape[0])
                if num_targets == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                if num_targets > num_queries:
                    raise ValueError(f"HungarianMatcher: image {b} has {num_targets} targets but only "
                                     f"{num_queries} queries; every target needs its own query")
                coords = self.sample_points(device)
                cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels.to(device), tgt["masks"].to(device),
                                        coords)
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
