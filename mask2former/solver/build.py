"""Optimizer, gradient clipping and LR schedule built from the ``SOLVER`` config.

Parameter groups follow Mask2Former's training script:

* lr is ``BASE_LR``, times ``BACKBONE_MULTIPLIER`` for parameters of modules whose qualified name
  contains ``"backbone"``;
* weight decay is ``WEIGHT_DECAY``; 0 for Swin's ``relative_position_bias_table`` and
  ``absolute_pos_embed``; ``WEIGHT_DECAY_NORM`` for parameters of normalization layers;
  ``WEIGHT_DECAY_EMBED`` for ``nn.Embedding`` weights (``query_feat``, ``query_embed``,
  ``level_embed`` of the transformer decoder);
* kMaX-DeepLab (``MODEL.META_ARCHITECTURE`` kMaXDeepLab) adds its training script's rules, applied
  last: no weight decay for parameters of modules named ``*_rpe*`` (axial attention's relative
  positions) or ``*_cluster_centers*``, and for parameters named ``*bias*`` or ``*gamma*``;
* Detectron2's legacy bias options: parameters named ``bias`` get ``lr * BIAS_LR_FACTOR`` and,
  when ``WEIGHT_DECAY_BIAS`` is not None, that weight decay (it takes precedence over the rules
  above, as in Detectron2). The defaults (1.0, None) change nothing.

Parameters that do not require grad are left out, and a parameter shared by several modules is
added once (with the settings of the first module that owns it). Parameters with equal settings
are merged into one group, in order of first appearance.

Gradient clipping is a function the trainer calls between ``backward()`` (and, under a grad
scaler, ``unscale_``) and ``optimizer.step()``; the optimizer class is not altered.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from fvcore.common.param_scheduler import (
    CosineParamScheduler,
    MultiStepParamScheduler,
    StepWithFixedGammaParamScheduler,
)
from torch import nn

from ..config.defaults import MASKFORMER2_DEFAULTS
from ..layers.norm import FrozenBatchNorm2d, LayerNorm2d
from .lr_scheduler import LRMultiplier, TF2WarmupPolyLR, WarmupParamScheduler, WarmupPolyParamScheduler

__all__ = [
    "NORM_MODULE_TYPES",
    "GradientClipper",
    "build_gradient_clipper",
    "build_lr_scheduler",
    "build_optimizer",
    "get_optimizer_param_groups",
]

logger = logging.getLogger(__name__)

NORM_MODULE_TYPES: Tuple[type, ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    # ours: FrozenBN has no parameters (listed for completeness); LayerNorm2d is the "LN" norm
    FrozenBatchNorm2d,
    LayerNorm2d,
)

_NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
_KMAX_NO_DECAY_MODULES = ("_rpe", "_cluster_centers")
_KMAX_NO_DECAY_PARAMS = ("bias", "gamma")


# ----------------------------------------------------------------------------- parameter groups
def get_optimizer_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    backbone_multiplier: float = 1.0,
    weight_decay_norm: Optional[float] = None,
    weight_decay_embed: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: Optional[float] = None,
    kmax_rules: bool = False,
) -> List[Dict[str, Any]]:
    """Optimizer param groups with the per-parameter lr / weight decay described in the module doc.

    ``None`` for ``weight_decay_norm`` / ``weight_decay_embed`` means "same as weight_decay";
    ``kmax_rules``: kMaX-DeepLab's no-decay rules.
    """
    seen: set = set()
    per_param: List[Tuple[nn.Parameter, float, float]] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = base_lr
            wd = weight_decay
            if "backbone" in module_name:
                lr = lr * backbone_multiplier
            if any(key in param_name for key in _NO_DECAY_PARAM_NAMES):
                wd = 0.0
            if isinstance(module, NORM_MODULE_TYPES) and weight_decay_norm is not None:
                wd = weight_decay_norm
            if isinstance(module, nn.Embedding) and weight_decay_embed is not None:
                wd = weight_decay_embed
            if kmax_rules and (any(key in module_name for key in _KMAX_NO_DECAY_MODULES)
                               or any(key in param_name for key in _KMAX_NO_DECAY_PARAMS)):
                wd = 0.0
            if param_name == "bias":
                lr = lr * bias_lr_factor
                if weight_decay_bias is not None:
                    wd = weight_decay_bias
            per_param.append((param, float(lr), float(wd)))

    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for param, lr, wd in per_param:
        group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})
        group["params"].append(param)
    return list(groups.values())


def _maskformer2_key(solver_cfg, key: str) -> Any:
    # A bare Detectron2 config (without add_maskformer2_config) lacks Mask2Former's SOLVER keys;
    # it gets their official defaults, the ones config/defaults.py holds.
    return solver_cfg.get(key, MASKFORMER2_DEFAULTS["SOLVER"][key])


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD") over :func:`get_optimizer_param_groups` groups."""
    s = cfg.SOLVER
    groups = get_optimizer_param_groups(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        backbone_multiplier=_maskformer2_key(s, "BACKBONE_MULTIPLIER"),
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_embed=_maskformer2_key(s, "WEIGHT_DECAY_EMBED"),
        bias_lr_factor=s.BIAS_LR_FACTOR,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        kmax_rules=cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab",
    )
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    optimizer = _maskformer2_key(s, "OPTIMIZER")
    name = str(optimizer).upper()
    if name == "SGD":
        return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=s.BASE_LR)
    raise ValueError(f"SOLVER.OPTIMIZER = {optimizer!r} is not supported; expected 'ADAMW' or 'SGD'")


# ----------------------------------------------------------------------------- gradient clipping
def _optimizer_params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


class GradientClipper:
    """Clips the gradients of an optimizer's parameters in place; call it before ``step()``.

    * ``"full_model"``: one total ``norm_type`` norm over all parameters, scaled to at most
      ``clip_value`` (Mask2Former's training setting);
    * ``"norm"``: the same, but separately for every parameter tensor (Detectron2);
    * ``"value"``: every gradient element clamped to ``[-clip_value, clip_value]``.

    Returns the total gradient norm before clipping for "full_model", else None.
    """

    TYPES = ("full_model", "norm", "value")

    def __init__(self, clip_type: str, clip_value: float, norm_type: float = 2.0):
        if clip_type not in self.TYPES:
            raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE = {clip_type!r}; expected one of {self.TYPES}")
        self.clip_type = clip_type
        self.clip_value = float(clip_value)
        self.norm_type = float(norm_type)

    def __call__(self, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
        params = [p for p in _optimizer_params(optimizer) if p.grad is not None]
        if not params:
            return None
        if self.clip_type == "full_model":
            return torch.nn.utils.clip_grad_norm_(params, self.clip_value, self.norm_type)
        if self.clip_type == "norm":
            for p in params:
                torch.nn.utils.clip_grad_norm_(p, self.clip_value, self.norm_type)
            return None
        torch.nn.utils.clip_grad_value_(params, self.clip_value)
        return None

    def __repr__(self) -> str:
        return f"GradientClipper({self.clip_type!r}, clip_value={self.clip_value}, norm_type={self.norm_type})"


def build_gradient_clipper(cfg) -> Optional[GradientClipper]:
    """The clipper for ``SOLVER.CLIP_GRADIENTS``, or None when clipping is disabled.

    As in Mask2Former, "full_model" clipping with ``CLIP_VALUE <= 0`` disables clipping.
    """
    c = cfg.SOLVER.CLIP_GRADIENTS
    if not c.ENABLED:
        return None
    clip_type = str(c.CLIP_TYPE)
    if clip_type == "full_model" and not c.CLIP_VALUE > 0.0:
        logger.warning("SOLVER.CLIP_GRADIENTS.CLIP_VALUE = %s <= 0: full-model clipping is disabled", c.CLIP_VALUE)
        return None
    return GradientClipper(clip_type, c.CLIP_VALUE, c.NORM_TYPE)


# ----------------------------------------------------------------------------- LR schedule
def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """``SOLVER.LR_SCHEDULER_NAME``: WarmupPolyLR, TF2WarmupPolyLR (kMaX-DeepLab's, see
    :class:`~.lr_scheduler.TF2WarmupPolyParamScheduler`), WarmupMultiStepLR, WarmupCosineLR or
    WarmupStepWithFixedGammaLR, with ``WARMUP_ITERS`` / ``WARMUP_FACTOR`` / ``WARMUP_METHOD``.

    WarmupPolyLR is DeepLab's schedule: the warmup factor multiplies ``(1 - it/MAX_ITER)**POLY_LR_POWER``
    and ``POLY_LR_CONSTANT_ENDING`` (> 0) is a floor applied after warmup. The other schedules
    follow Detectron2: a linear (or constant) warmup phase over the first WARMUP_ITERS iterations
    ending at the main schedule's value, then the main schedule at absolute positions.
    """
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    max_iter = int(s.MAX_ITER)
    if max_iter <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be positive, got {max_iter}")

    if name == "TF2WarmupPolyLR":
        return TF2WarmupPolyLR(optimizer, max_iter, warmup_factor=s.WARMUP_FACTOR, warmup_iters=s.WARMUP_ITERS,
                               warmup_method=s.WARMUP_METHOD, power=s.POLY_LR_POWER,
                               constant_ending=s.POLY_LR_CONSTANT_ENDING)
    if name == "WarmupPolyLR":
        sched = WarmupPolyParamScheduler(
            max_iter,
            power=s.POLY_LR_POWER,
            constant_ending=s.POLY_LR_CONSTANT_ENDING,
            warmup_factor=s.WARMUP_FACTOR,
            warmup_iters=s.WARMUP_ITERS,
            warmup_method=s.WARMUP_METHOD,
        )
        return LRMultiplier(optimizer, sched, max_iter)

    if name == "WarmupMultiStepLR":
        steps = sorted(int(x) for x in s.STEPS)
        if _maskformer2_key(s, "INSTANT_DROP"):  # MP-Former's train_net.py
            drop = int(_maskformer2_key(s, "DROP_EP"))
            steps = [drop, drop + 15000]
        kept = [x for x in steps if x < max_iter]
        if len(kept) != len(steps):
            logger.warning("SOLVER.STEPS %s has values >= SOLVER.MAX_ITER (%d); they are ignored", steps, max_iter)
        main = MultiStepParamScheduler(
            values=[s.GAMMA ** k for k in range(len(kept) + 1)], milestones=kept, num_updates=max_iter
        )
    elif name == "WarmupCosineLR":
        end_value = s.BASE_LR_END / s.BASE_LR
        if not 0.0 <= end_value <= 1.0:
            raise ValueError(f"SOLVER.BASE_LR_END / BASE_LR = {end_value} must be in [0, 1]")
        main = CosineParamScheduler(1.0, end_value)
    elif name == "WarmupStepWithFixedGammaLR":
        main = StepWithFixedGammaParamScheduler(
            base_value=1.0, gamma=s.GAMMA, num_decays=s.NUM_DECAYS, num_updates=max_iter
        )
    else:
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME = {name!r} is not supported; expected one of WarmupPolyLR, TF2WarmupPolyLR, "
            "WarmupMultiStepLR, WarmupCosineLR, WarmupStepWithFixedGammaLR"
        )
    sched = WarmupParamScheduler(
        main,
        s.WARMUP_FACTOR,
        min(s.WARMUP_ITERS / max_iter, 1.0),
        s.WARMUP_METHOD,
        s.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, sched, max_iter)

