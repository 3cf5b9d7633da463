"""Optimizer, gradient clipping and learning-rate schedules for training (``SOLVER.*`` keys)."""
from .build import (
    NORM_MODULE_TYPES,
    GradientClipper,
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    get_optimizer_param_groups,
)
from .lr_scheduler import (
    LRMultiplier,
    TF2WarmupPolyLR,
    TF2WarmupPolyParamScheduler,
    WarmupParamScheduler,
    WarmupPolyParamScheduler,
    warmup_factor_at_iter,
)

__all__ = [
    "NORM_MODULE_TYPES",
    "GradientClipper",
    "LRMultiplier",
    "TF2WarmupPolyLR",
    "TF2WarmupPolyParamScheduler",
    "WarmupParamScheduler",
    "WarmupPolyParamScheduler",
    "build_gradient_clipper",
    "build_lr_scheduler",
    "build_optimizer",
    "get_optimizer_param_groups",
    "warmup_factor_at_iter",
]
