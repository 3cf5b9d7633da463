"""kMaX-DeepLab's training losses (MaX-DeepLab's PQ-style losses as the official kMaX code has
them) and its matcher.

Shapes: B images, Q queries, K classes (+1 void logit), P = h*w pixels of the stride-4 output.
``outputs`` (the decoder's, see kmax_transformer_decoder.py): "pred_logits" (B, Q, K+1),
"pred_masks" (B, Q, h, w), "pixel_feature" (B, C, h, w), "aux_outputs" (one such dict per
k-means layer) and optionally "aux_semantic_pred" (B, K(+1), h', w').
``targets``: B dicts with "labels" int64 (T,) and "masks" (T, h, w) at the stride-4 size.

Matching (:class:`kMaXMatcher`): per image, Hungarian matching maximising
mask_similarity * class_probability, where class_probability[q, t] is query q's softmax
probability of t's class and mask_similarity[q, t] = sum(p_q g_t) / ((sum p_q + sum g_t) / 2 + 1e-5)
with p the softmax over queries of the mask logits (zeroed on pixels no target covers when
MASKING_VOID_PIXEL). The matched values are the loss weights below ("PQ-style" weighting).

Losses (each per image, then the mean over images; "mean of non-zero" = sum / max(1, number of
non-zero terms)):
  loss_ce            cross-entropy of every query's class (void for unmatched queries), times 0.75
                     (0.25 for void targets), times the query's mask similarity (matched: its
                     matched value; unmatched: the share of its mask on void pixels), clamped
                     below at NO_OBJECT_WEIGHT; mean of non-zero.
  loss_mask          mask-ID cross-entropy: per pixel, the cross-entropy of the softmax over
                     queries against the (normalised) ground-truth query of the pixel; void
                     pixels excluded; mean of non-zero.
  loss_dice          per query 1 - (2 sum(p g) + 1) / (sum p + sum g + 1), p the softmax over
                     queries (zero on void pixels), times its matched class probability (clamped
                     below at NO_OBJECT_WEIGHT; 0 for unmatched queries); sum over queries * 0.75 / Q.
  loss_pixel_insdis  pixel instance discrimination: PIXEL_INSDIS_SAMPLE_K pixels drawn without
                     replacement with probability ~ (P / area of the pixel's segment) **
                     PIXEL_INSDIS_TEMPERATURE (void pixels never), by the Gumbel top-k trick; the
                     cross-entropy of their feature similarities / 0.3 against the normalised
                     same-segment matrix; mean of non-zero.
  loss_aux_semantic  (final output only) per-pixel cross-entropy of the auxiliary semantic
                     prediction on AUX_SEMANTIC_SAMPLE_K pixels drawn the same way (temperature
                     AUX_SEMANTIC_TEMPERATURE; 0: every pixel); void ignored; mean of non-zero.
With deep supervision every aux_outputs[i] gets the first four as "<name>_<i>"; with
SHARE_FINAL_MATCHING they reuse the final output's matching and loss weights.

Sampling draws its Gumbel noise from the criterion's own generator (one per device), seeded with
``seed`` (the run's SEED) plus the process' rank: the same seed gives the same pixels, and the
processes of a multi-process run draw different ones (as in the official code, whose noise comes
from the global RNG that Detectron2 seeds with SEED + rank). The generators' states are part of
the run's RNG state (``rng_state_dict`` / ``load_rng_state_dict``, see mask2former.utils.rng), so
a resumed run continues their streams. A sample size larger than the number of pixels takes every
pixel (the official code then fails).

Multi-process training: nothing is all-reduced (the official code reduces nothing either): every
term is normalised per image and averaged over the process' images, so with equal per-process
batches DDP's gradient average equals the full batch's gradient, up to the pixel samples.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from ..utils.comm import get_rank
from ..utils.rng import resolve_seed

__all__ = ["kMaXMatcher", "kMaXSetCriterion", "build_kmax_criterion", "gumbel_topk", "mean_of_nonzero",
           "class_loss", "mask_id_loss", "dice_loss", "pixel_insdis_loss", "aux_semantic_loss"]

_VOID_LOGIT = -99999.0  # added to the sampling logits of void pixels
_ALPHA = 0.75  # weight of non-void class targets (void ones get 1 - _ALPHA)
_DICE_FACTOR = 0.75
_INSDIS_TEMPERATURE = 0.3


def mean_of_nonzero(loss: torch.Tensor) -> torch.Tensor:
    """(B, N) per-element losses -> the mean over images of sum / max(1, number of non-zero)."""
    count = (loss != 0).to(loss).sum(-1).clamp(min=1.0)
    return (loss.sum(-1) / count).mean()


def gumbel_topk(logits: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, P) logits -> (B, min(k, P)) indices drawn without replacement with probability
    ~ softmax(logits), by adding Gumbel noise and taking the top k."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return torch.topk(logits - torch.log(-torch.log(uniform)), min(k, logits.shape[-1]), dim=-1)[1]


def class_loss(logits: torch.Tensor, target_classes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits (B, Q, K+1), target_classes (B, Q) (K = void), weight (B, Q) -> loss_ce."""
    ce = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")
    is_void = (target_classes == logits.shape[-1] - 1).to(ce)
    return mean_of_nonzero(ce * (_ALPHA * (1 - is_void) + (1 - _ALPHA) * is_void) * weight)


def mask_id_loss(mask_logits: torch.Tensor, target: torch.Tensor, void: torch.Tensor) -> torch.Tensor:
    """mask_logits, target (B, Q, P) (target sums to 1 over Q on labelled pixels), void (B, P) -> loss_mask."""
    ce = F.cross_entropy(mask_logits, target, reduction="none").masked_fill(void, 0.0)
    return mean_of_nonzero(ce)


def dice_loss(mask_logits: torch.Tensor, target: torch.Tensor, void: Optional[torch.Tensor],
              weight: torch.Tensor) -> torch.Tensor:
    """mask_logits, target (B, Q, P), void (B, P) or None (no masking), weight (B, Q) -> loss_dice."""
    probs = mask_logits.softmax(1)
    if void is not None:
        probs = probs.masked_fill(void[:, None], 0.0)
    dice = (2 * (probs * target).sum(-1) + 1) / (probs.sum(-1) + target.sum(-1) + 1)
    return ((1 - dice) * weight).sum(1).mul(_DICE_FACTOR / probs.shape[1]).mean()


def _sample_logits(inverse_area: torch.Tensor, void: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log(inverse_area) * temperature + void.to(inverse_area) * _VOID_LOGIT


def pixel_insdis_loss(feature: torch.Tensor, target: torch.Tensor, void: torch.Tensor, inverse_area: torch.Tensor,
                      temperature: float, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """feature (B, C, P), target (B, Q, P), void, inverse_area (B, P) -> loss_pixel_insdis."""
    index = gumbel_topk(_sample_logits(inverse_area, void, temperature), k, generator)  # (B, k)
    gt = torch.gather(target, 2, index[:, None].expand(-1, target.shape[1], -1))  # (B, Q, k)
    gt_sim = torch.einsum("bqk,bqj->bkj", gt, gt)
    gt_sim = gt_sim / gt_sim.sum(1, keepdim=True).clamp(min=1.0)
    f = torch.gather(feature, 2, index[:, None].expand(-1, feature.shape[1], -1))  # (B, C, k)
    pred_sim = torch.einsum("bck,bcj->bkj", f, f) / _INSDIS_TEMPERATURE
    return mean_of_nonzero(F.cross_entropy(pred_sim, gt_sim, reduction="none"))


def _subsample_stride(size: int, target: int) -> int:
    if target > 1 and (size - 1) % (target - 1) == 0:
        return (size - 1) // (target - 1)  # odd sizes: corners aligned
    if size % target == 0:
        return size // target
    raise ValueError(f"the auxiliary semantic prediction has {target} rows/columns where the labels have {size}: "
                     "not a stride of the stride-4 output (INPUT.IMAGE_SIZE should be 32k or 32k+1)")


def aux_semantic_loss(logits: torch.Tensor, semantic: torch.Tensor, void: torch.Tensor, inverse_area: torch.Tensor,
                      temperature: float, k: int, num_classes: int,
                      generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, C, h', w'), semantic (B, h, w) (num_classes = void), void, inverse_area (B, h, w)
    -> loss_aux_semantic; labels are subsampled to a coarser prediction."""
    if logits.shape[-2:] != semantic.shape[-2:]:
        strides = {_subsample_stride(s, t) for s, t in zip(semantic.shape[-2:], logits.shape[-2:])}
        if len(strides) != 1:
            raise ValueError(f"the auxiliary semantic prediction {tuple(logits.shape[-2:])} and the labels "
                             f"{tuple(semantic.shape[-2:])} differ in stride between rows and columns")
        s = strides.pop()
        semantic, void, inverse_area = (t[:, ::s, ::s] for t in (semantic, void, inverse_area))
    logits, semantic = logits.flatten(2), semantic.flatten(1)
    if k > 0:
        index = gumbel_topk(_sample_logits(inverse_area.flatten(1), void.flatten(1), temperature), k, generator)
        semantic = torch.gather(semantic, 1, index)
        logits = torch.gather(logits, 2, index[:, None].expand(-1, logits.shape[1], -1))
    return mean_of_nonzero(F.cross_entropy(logits, semantic, ignore_index=num_classes, reduction="none"))


class kMaXMatcher(nn.Module):
    """Hungarian matching by mask similarity * class probability (see the module docstring)."""

    def __init__(self, masking_void_pixel: bool = True):
        super().__init__()
        self.masking_void_pixel = masking_void_pixel

    @torch.no_grad()
    def similarities(self, logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                     masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One image: logits (Q, K+1), mask_logits (Q, P), labels (T,), masks (T, P) ->
        (mask similarity, class probability), each (Q, T)."""
        class_prob = logits.float().softmax(-1)[:, labels]
        probs = mask_logits.float().softmax(0)
        masks = masks.float()
        if self.masking_void_pixel:
            probs = probs * (masks.sum(0, keepdim=True) > 0)
        denominator = (probs.sum(-1)[:, None] + masks.sum(-1)[None]) / 2
        return probs @ masks.T / (denominator + 1e-5), class_prob

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: Sequence[Dict]):
        """-> (indices [(query idx, target idx)] per image, matched mask similarities, matched class probabilities)."""
        indices, matched_sim, matched_prob = [], [], []
        for b, t in enumerate(targets):
            sim, prob = self.similarities(outputs["pred_logits"][b], outputs["pred_masks"][b].flatten(1),
                                          t["labels"], t["masks"].flatten(1))
            rows, cols = linear_sum_assignment((-sim * prob).cpu().numpy())
            rows, cols = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
            indices.append((rows, cols))
            matched_sim.append(sim[rows, cols])
            matched_prob.append(prob[rows, cols])
        return indices, matched_sim, matched_prob

    def extra_repr(self) -> str:
        return f"masking_void_pixel={self.masking_void_pixel}"


class kMaXSetCriterion(nn.Module):
    """kMaX-DeepLab's losses; ``forward(outputs, targets)`` returns them unweighted
    (``weight_dict`` holds the weights, which the model applies)."""

    LOSSES = ("labels", "masks", "pixels", "aux_semantic")

    def __init__(self, num_classes: int, *, weight_dict: Dict[str, float], eos_coef: float,
                 losses: Sequence[str] = ("labels", "masks"), share_final_matching: bool = True,
                 matcher: Optional[kMaXMatcher] = None, pixel_insdis_temperature: float = 1.5,
                 pixel_insdis_sample_k: int = 4096, aux_semantic_temperature: float = 2.0,
                 aux_semantic_sample_k: int = 4096, masking_void_pixel: bool = True, seed: int = 0):
        super().__init__()
        unknown = [x for x in losses if x not in self.LOSSES]
        if unknown:
            raise ValueError(f"unknown kMaX losses {unknown}; known: {list(self.LOSSES)}")
        self.num_classes = num_classes
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.share_final_matching = share_final_matching
        self.matcher = matcher if matcher is not None else kMaXMatcher(masking_void_pixel)
        self.pixel_insdis_temperature = pixel_insdis_temperature
        self.pixel_insdis_sample_k = int(pixel_insdis_sample_k)
        self.aux_semantic_temperature = aux_semantic_temperature
        self.aux_semantic_sample_k = int(aux_semantic_sample_k)
        self.masking_void_pixel = masking_void_pixel
        self.seed = int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This criterion's generator on ``device`` (seeded with ``seed`` + rank on first use)."""
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed + get_rank())
        return self._generators[device]

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators.clear()

    def rng_state_dict(self) -> Dict[str, torch.Tensor]:
        """``{device: generator state}`` of the generators used so far (the run's RNG state)."""
        return {str(device): g.get_state() for device, g in self._generators.items()}

    def load_rng_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for device, generator_state in state.items():
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # a CUDA run resumed on the CPU: the CPU generator starts from the seed
            self.generator(device).set_state(generator_state.cpu())

    @torch.no_grad()
    def process_targets(self, outputs: Dict, targets: Sequence[Dict], matching) -> Dict[str, torch.Tensor]:
        """The dense (B, Q, ...) targets and loss weights of one matching (see the module docstring)."""
        indices, matched_sim, matched_prob = matching
        logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"].detach().float()
        b_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        q_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        masks = torch.zeros_like(mask_logits)
        masks[b_idx, q_idx] = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)
                                         ]).to(masks)
        masks = masks / masks.sum(1, keepdim=True).clamp(min=1.0)  # overlapping masks share a pixel
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[b_idx, q_idx] = torch.cat([t["labels"][j.to(t["labels"].device)]
                                           for t, (_, j) in zip(targets, indices)]).to(classes)
        void = masks.sum(1) < 1  # (B, h, w)
        h, w = void.shape[-2:]
        pixel_area = torch.einsum("bqhw,bq->bhw", masks, masks.sum((2, 3)))
        mask_weight = torch.zeros(logits.shape[:2], device=logits.device)  # unmatched masks: no dice loss
        mask_weight[b_idx, q_idx] = torch.cat(matched_prob).to(mask_weight).clamp(min=self.eos_coef)
        probs = mask_logits.softmax(1).flatten(2)
        # an unmatched query's class weight: the share of its mask that lies on void pixels
        class_weight = torch.einsum("bqp,bp->bq", probs, void.flatten(1).to(probs)) / (probs.sum(-1) + 1e-5)
        class_weight[b_idx, q_idx] = torch.cat(matched_sim).to(class_weight)
        semantic = torch.full((len(targets), h, w), self.num_classes, dtype=torch.int64, device=logits.device)
        for i, t in enumerate(targets):
            for label, m in zip(t["labels"], t["masks"]):
                semantic[i][m.to(semantic.device) > 0] = int(label)
        return {"masks": masks, "labels": classes, "void": void, "inverse_area": h * w / pixel_area.clamp(min=1.0),
                "mask_weight": mask_weight, "class_weight": class_weight.clamp(min=self.eos_coef),
                "semantic": semantic}

    def layer_losses(self, outputs: Dict, gt: Dict[str, torch.Tensor], final: bool) -> Dict[str, torch.Tensor]:
        losses = {}
        masks, void = gt["masks"].flatten(2), gt["void"].flatten(1)
        mask_logits = outputs["pred_masks"].float().flatten(2)
        if "labels" in self.losses:
            losses["loss_ce"] = class_loss(outputs["pred_logits"].float(), gt["labels"], gt["class_weight"])
        if "masks" in self.losses:
            losses["loss_mask"] = mask_id_loss(mask_logits, masks, void)
            losses["loss_dice"] = dice_loss(mask_logits, masks, void if self.masking_void_pixel else None,
                                            gt["mask_weight"])
        if "pixels" in self.losses:
            losses["loss_pixel_insdis"] = pixel_insdis_loss(
                outputs["pixel_feature"].float().flatten(2), masks, void, gt["inverse_area"].flatten(1),
                self.pixel_insdis_temperature, self.pixel_insdis_sample_k, self.generator(mask_logits.device))
        if "aux_semantic" in self.losses and final:
            if "aux_semantic_pred" not in outputs:
                raise KeyError("the kMaX auxiliary semantic loss (MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT > 0) needs "
                               "the decoder's 'aux_semantic_pred' (the model in training mode)")
            losses["loss_aux_semantic"] = aux_semantic_loss(
                outputs["aux_semantic_pred"].float(), gt["semantic"], gt["void"], gt["inverse_area"],
                self.aux_semantic_temperature, self.aux_semantic_sample_k, self.num_classes,
                self.generator(mask_logits.device))
        return losses

    def check_targets(self, outputs: Dict, targets: Sequence[Dict]) -> None:
        n, size = outputs["pred_logits"].shape[0], tuple(outputs["pred_masks"].shape[-2:])
        if len(targets) != n:
            raise ValueError(f"kMaXSetCriterion: {n} images but {len(targets)} targets")
        for i, t in enumerate(targets):
            labels, masks = t["labels"], t["masks"]
            if masks.dim() != 3 or tuple(masks.shape[-2:]) != size or labels.shape != masks.shape[:1]:
                raise ValueError(f"kMaXSetCriterion: targets[{i}] has labels {tuple(labels.shape)} and masks "
                                 f"{tuple(masks.shape)}; expected (T,) and (T, {size[0]}, {size[1]}), the size of "
                                 "the predicted masks")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"kMaXSetCriterion: targets[{i}]['labels'] must lie in [0, {self.num_classes})")

    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        self.check_targets(outputs, targets)
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        gt = self.process_targets(final, targets, self.matcher(final, targets))
        losses = self.layer_losses(final, gt, final=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            if not self.share_final_matching:
                gt = self.process_targets(aux, targets, self.matcher(aux, targets))
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, gt, final=False).items()})
        return losses

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
                f"share_final_matching={self.share_final_matching}, seed={self.seed}")


def build_kmax_criterion(cfg, num_classes: int, seed: Optional[int] = None) -> kMaXSetCriterion:
    """The criterion of MODEL.KMAX_DEEPLAB.*; the sampling ``seed`` defaults to SEED (drawn and
    logged when SEED < 0)."""
    k = cfg.MODEL.KMAX_DEEPLAB
    weight_dict = {"loss_ce": k.CLASS_WEIGHT, "loss_mask": k.MASK_WEIGHT, "loss_dice": k.DICE_WEIGHT,
                   "loss_pixel_insdis": k.INSDIS_WEIGHT, "loss_aux_semantic": k.AUX_SEMANTIC_WEIGHT}
    if k.DEEP_SUPERVISION:
        layer = dict(weight_dict)
        for i in range(sum(k.TRANS_DEC.DEC_LAYERS)):
            weight_dict.update({f"{name}_{i}": v for name, v in layer.items()})
    losses: List[str] = ["labels", "masks"]
    if k.INSDIS_WEIGHT > 0:
        losses.append("pixels")
    if k.AUX_SEMANTIC_WEIGHT > 0:
        losses.append("aux_semantic")
    if seed is None:
        seed = resolve_seed(cfg.SEED, "kMaX pixel-sampling seed")
    return kMaXSetCriterion(
        num_classes, weight_dict=weight_dict, eos_coef=k.NO_OBJECT_WEIGHT, losses=losses,
        share_final_matching=k.SHARE_FINAL_MATCHING, pixel_insdis_temperature=k.PIXEL_INSDIS_TEMPERATURE,
        pixel_insdis_sample_k=k.PIXEL_INSDIS_SAMPLE_K, aux_semantic_temperature=k.AUX_SEMANTIC_TEMPERATURE,
        aux_semantic_sample_k=k.AUX_SEMANTIC_SAMPLE_K, masking_void_pixel=k.MASKING_VOID_PIXEL, seed=seed)
