"""Set criterion of Mask2Former: Hungarian matching, then classification and mask losses.

``empty_weight`` (K+1,) is part of the official checkpoints: 1 for every class and
NO_OBJECT_WEIGHT for the "no object" class, used by the classification loss.

``forward(outputs, targets)``:
    outputs: "pred_logits" (N, Q, K+1), "pred_masks" (N, Q, h, w) mask logits (h, w = H/4, W/4
        of the padded batch), optionally "aux_outputs": a list of dicts with the same two keys,
        one per earlier decoder layer (deep supervision).
    targets: N dicts with "labels" int64 (T_i,) in [0, K) and "masks" (T_i, H, W) bool/float,
        zero-padded to the padded batch size (H, W) so that [0, 1]^2 spans the same area in
        predictions and targets.
    returns {"loss_ce", "loss_mask", "loss_dice"} plus "<name>_<i>" for aux_outputs[i]; the
        losses are NOT multiplied by ``weight_dict`` (the model does that).

Losses (M = matched pairs over the batch, num_masks = total targets averaged over workers, >= 1):
    loss_ce:   cross-entropy over K+1 classes of every query, weighted by ``empty_weight``
               (weighted mean); unmatched queries have target "no object" (index K).
    loss_mask: sum over matched pairs of the mean sigmoid BCE over P points, / num_masks.
    loss_dice: sum over matched pairs of 1 - (2 sum(s g) + 1) / (sum s + sum g + 1), / num_masks.
MP-Former (``mp_losses=True``): ``outputs["dn_out"]`` holds the mask-piloted queries' predictions
(same keys, and "layout", see ``transformer_decoder/mask_piloting.py``). Each MP slot is assigned
directly to the object it was built from (no matching); padding slots have target "no object".
The same three losses, "<name>_dn" (and "<name>_dn_<i>" for its aux_outputs[i]), with num_masks
multiplied by the number of MP groups. Without "dn_out" (no object in the batch) they are zeros.

The P = ``num_points`` points of each matched prediction are drawn by uncertainty-based
importance sampling (``get_uncertain_point_coords_with_randomness`` with -|logit|); the
prediction and its target are both read at those points by bilinear interpolation, so no
full-resolution mask is ever built. ``dense=True`` instead upsamples the matched predictions to
(H, W) and averages over every pixel — it exists only as the baseline of the memory benchmark.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..layers.point_features import calculate_uncertainty, get_uncertain_point_coords_with_randomness, point_sample
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "build_criterion", "sigmoid_ce_loss", "dice_loss", "semantic_prior_loss"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """logits, targets (M, P): sum over masks of the mean BCE-with-logits over P, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """logits, targets (M, P): sum over masks of the +1-smoothed dice loss, / num_masks."""
    probs = logits.sigmoid()
    inter = (probs * targets).sum(1)
    total = probs.sum(1) + targets.sum(1)
    return (1 - (2 * inter + 1) / (total + 1)).sum() / num_masks


def semantic_prior_loss(logits: torch.Tensor, labels: Sequence[torch.Tensor], ignore_value: int) -> torch.Tensor:
    """SeMask's ``loss_cate``: per-pixel cross-entropy of prior logits (N, K, H, W) against each
    image's label map (h_i, w_i) (int, ``ignore_value`` = unlabelled), which is padded bottom/right
    with ``ignore_value`` to (H, W); the mean over labelled pixels of the batch (0 when none is)."""
    n, k, h, w = logits.shape
    if len(labels) != n:
        raise ValueError(f"semantic_prior_loss: {n} prior maps but {len(labels)} label maps")
    target = torch.full((n, h, w), ignore_value, dtype=torch.int64, device=logits.device)
    for i, lab in enumerate(labels):
        if lab.dim() != 2 or lab.shape[0] > h or lab.shape[1] > w:
            raise ValueError(f"semantic_prior_loss: label map {i} has shape {tuple(lab.shape)}; expected (h, w) "
                             f"within the padded batch size {h}x{w}")
        target[i, :lab.shape[0], :lab.shape[1]] = lab.to(logits.device)
    valid = target[target != ignore_value]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= k):
        raise ValueError(f"semantic_prior_loss: labels must lie in [0, {k}) or equal the ignore value {ignore_value}; "
                         f"got min {int(valid.min())}, max {int(valid.max())}")
    if not valid.numel():  # the official mean over no pixel is NaN, which would stop training
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_value)


def _dist_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, *, weight_dict: Dict[str, float], eos_coef: float, num_points: int,
                 oversample_ratio: float, importance_sample_ratio: float, matcher: Optional[nn.Module] = None,
                 dense: bool = False, mp_losses: bool = False):
        super().__init__()
        self.mp_losses = mp_losses
        self.num_classes = num_classes
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.dense = dense
        if matcher is None:
            matcher = HungarianMatcher(cost_class=weight_dict.get("loss_ce", 1.0),
                                       cost_mask=weight_dict.get("loss_mask", 1.0),
                                       cost_dice=weight_dict.get("loss_dice", 1.0), num_points=num_points)
        self.matcher = matcher
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # ---- helpers -------------------------------------------------------------------------
    def check_targets(self, outputs: Dict, targets: Sequence[Dict]) -> None:
        n = outputs["pred_logits"].shape[0]
        if not isinstance(targets, (list, tuple)) or len(targets) != n:
            raise ValueError(f"SetCriterion: expected a list of {n} target dicts (one per image), got "
                             f"{type(targets).__name__} of length {len(targets) if hasattr(targets, '__len__') else '?'}")
        size = None
        for i, t in enumerate(targets):
            if "labels" not in t or "masks" not in t:
                raise KeyError(f"SetCriterion: targets[{i}] needs 'labels' (T,) and 'masks' (T, H, W); has {sorted(t)}")
            labels, masks = t["labels"], t["masks"]
            if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"SetCriterion: targets[{i}] has labels {tuple(labels.shape)} and masks "
                                 f"{tuple(masks.shape)}; expected (T,) and (T, H, W)")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"SetCriterion: targets[{i}]['labels'] must lie in [0, {self.num_classes}); got "
                                 f"min {int(labels.min())}, max {int(labels.max())}")
            if size is None:
                size = tuple(masks.shape[-2:])
            elif tuple(masks.shape[-2:]) != size:
                raise ValueError(f"SetCriterion: target masks must all be padded to the batch size; targets[0] "
                                 f"is {size}, targets[{i}] is {tuple(masks.shape[-2:])}")

    def num_masks(self, targets: Sequence[Dict], device: torch.device) -> float:
        """Targets in the batch, averaged over distributed workers, at least 1."""
        total = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = _dist_world_size()
        if world > 1:
            torch.distributed.all_reduce(total)
        return max(total.item() / world, 1.0)

    def sample_points(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(M, 1, h, w) matched mask logits -> (M, num_points, 2) loss points: importance sampling
        of uncertain (|logit| near 0) points plus uniform ones."""
        return get_uncertain_point_coords_with_randomness(
            mask_logits, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio)

    @staticmethod
    def _query_index(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    # ---- losses --------------------------------------------------------------------------
    def loss_labels(self, outputs: Dict, targets: Sequence[Dict], indices: Indices) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()  # (N, Q, K+1)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        b, q = self._query_index(indices)
        matched = [t["labels"].to(logits.device)[tgt] for t, (_, tgt) in zip(targets, indices)]
        target_classes[b.to(logits.device), q.to(logits.device)] = torch.cat(matched).long()
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.empty_weight.float())
        return {"loss_ce": loss}

    def loss_masks(self, outputs: Dict, targets: Sequence[Dict], indices: Indices,
                   num_masks: float) -> Dict[str, torch.Tensor]:
        pred_masks = outputs["pred_masks"]  # (N, Q, h, w)
        device = pred_masks.device
        b, q = self._query_index(indices)
        src = pred_masks[b.to(device), q.to(device)]  # (M, h, w)
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0  # keeps every parameter in the graph
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        tgt = torch.cat([t["masks"].to(device)[j.to(device)] for t, (_, j) in zip(targets, indices)])
        tgt = tgt.to(src.dtype)[:, None]  # (M, 1, H, W)
        src = src[:, None]  # (M, 1, h, w)
        if self.dense:
            logits = F.interpolate(src, size=tgt.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
            labels = tgt.flatten(1)
        else:
            with torch.no_grad():
                coords = self.sample_points(src)
                labels = point_sample(tgt, coords)[:, 0]  # (M, P)
            logits = point_sample(src, coords)[:, 0]  # (M, P)
        logits, labels = logits.float(), labels.float()
        return {"loss_mask": sigmoid_ce_loss(logits, labels, num_masks),
                "loss_dice": dice_loss(logits, labels, num_masks)}

    def layer_losses(self, outputs: Dict, targets: Sequence[Dict], num_masks: float) -> Dict[str, torch.Tensor]:
        """Match one layer's predictions to the targets and compute its three losses."""
        for key in ("pred_logits", "pred_masks"):
            if key not in outputs:
                raise KeyError(f"SetCriterion: the decoder output lacks {key!r} (has {sorted(outputs)}); "
                               "the criterion needs mask classification outputs")
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices)
        losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        self.check_targets(outputs, targets)
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        main.pop("dn_out", None)
        losses = self.layer_losses(main, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_masks).items()})
        if self.mp_losses:
            losses.update(self.mask_piloted_losses(outputs, targets, num_masks))
        return losses

    def mask_piloted_losses(self, outputs: Dict, targets: Sequence[Dict], num_masks: float) -> Dict[str, torch.Tensor]:
        """MP-Former's losses of the MP queries, every layer, by direct assignment."""
        dn = outputs.get("dn_out")
        if dn is None:  # nothing was piloted: zeros under the same names
            zero = torch.zeros((), device=outputs["pred_logits"].device)
            names = [""] + [f"_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
            return {f"{k}_dn{n}": zero for n in names for k in ("loss_ce", "loss_mask", "loss_dice")}
        layers = [("", dn)] + [(f"_{i}", aux) for i, aux in enumerate(dn["aux_outputs"])]
        layout = dn["layout"]
        matches = layout.matches([len(t["labels"]) for t in targets])
        losses = {}
        for suffix, layer in layers:
            part = self.loss_labels(layer, targets, matches)
            part.update(self.loss_masks(layer, targets, matches, num_masks * layout.num_groups))
            losses.update({f"{k}_dn{suffix}": v for k, v in part.items()})
        return losses

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, num_points={self.num_points}, "
                f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}, "
                f"dense={self.dense}, weight_dict={self.weight_dict}")


def build_criterion(cfg, num_classes: int, dense: bool = False, mp_losses: bool = False) -> SetCriterion:
    """``mp_losses``: add MP-Former's losses (the decoder is mask-piloted); MODEL.MASK_FORMER.DN_NO_LB
    then leaves out their classification terms."""
    mf = cfg.MODEL.MASK_FORMER
    weight_dict = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
    if mp_losses:
        weight_dict.update({f"{k}_dn": v for k, v in weight_dict.items() if not (mf.DN_NO_LB and k == "loss_ce")})
    if mf.DEEP_SUPERVISION:
        # one set of auxiliary losses per earlier prediction (DEC_LAYERS - 1 of them)
        layer = dict(weight_dict)
        for i in range(mf.DEC_LAYERS - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in layer.items()})
    matcher = HungarianMatcher(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
                               num_points=mf.TRAIN_NUM_POINTS)
    return SetCriterion(num_classes, weight_dict=weight_dict, eos_coef=mf.NO_OBJECT_WEIGHT,
                        num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
                        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO, matcher=matcher, dense=dense,
                        mp_losses=mp_losses)
