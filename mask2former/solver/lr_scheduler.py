"""Iteration-based learning-rate schedules.

Every schedule is a *multiplier* of each param group's initial learning rate, so groups with
different base rates (backbone multiplier, bias factor) keep their ratios. The multiplier is an
fvcore :class:`~fvcore.common.param_scheduler.ParamScheduler` evaluated at
``iteration / max_iter``, or a schedule defined directly on integer iterations
(:class:`WarmupPolyParamScheduler`), which is evaluated at the iteration itself so that warmup
boundaries and the poly formula use exact integers.

:class:`LRMultiplier` is the ``torch.optim.lr_scheduler`` object the trainer steps once per
iteration; its state is only ``last_epoch`` (= iteration) and the base learning rates, so a
checkpointed scheduler resumes exactly.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Union

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)

try:  # torch >= 2.0
    from torch.optim.lr_scheduler import LRScheduler as _TorchLRScheduler
except ImportError:  # pragma: no cover - older torch
    from torch.optim.lr_scheduler import _LRScheduler as _TorchLRScheduler

__all__ = [
    "LRMultiplier",
    "TF2WarmupPolyLR",
    "TF2WarmupPolyParamScheduler",
    "WarmupParamScheduler",
    "WarmupPolyParamScheduler",
    "warmup_factor_at_iter",
]

_WARMUP_METHODS = ("linear", "constant")


def warmup_factor_at_iter(method: str, it: int, warmup_iters: int, warmup_factor: float) -> float:
    """LR factor of iteration ``it`` during warmup; 1.0 once ``it >= warmup_iters``.

    "linear" ramps from ``warmup_factor`` (iteration 0) towards 1; "constant" holds it.
    """
    if it >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = it / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    raise ValueError(f"SOLVER.WARMUP_METHOD = {method!r}; expected one of {_WARMUP_METHODS}")


class WarmupPolyParamScheduler(ParamScheduler):
    """DeepLab's poly schedule with warmup (Detectron2 ``WarmupPolyLR``), as a multiplier.

    At iteration ``it``: ``warmup(it) * (1 - it / max_iter) ** power``. The warmup factor multiplies
    the poly term (it is not a separate phase). When ``constant_ending > 0``, warmup is over and the
    poly term has fallen below ``constant_ending``, the multiplier is ``constant_ending``.
    """

    def __init__(
        self,
        max_iter: int,
        *,
        power: float = 0.9,
        constant_ending: float = 0.0,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
    ):
        if max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be positive for WarmupPolyLR, got {max_iter}")
        if warmup_method not in _WARMUP_METHODS:
            raise ValueError(f"SOLVER.WARMUP_METHOD = {warmup_method!r}; expected one of {_WARMUP_METHODS}")
        self.max_iter = int(max_iter)
        self.power = float(power)
        self.constant_ending = float(constant_ending)
        self.warmup_factor = float(warmup_factor)
        self.warmup_iters = int(warmup_iters)
        self.warmup_method = warmup_method

    def value_at_iter(self, it: Union[int, float]) -> float:
        factor = warmup_factor_at_iter(self.warmup_method, it, self.warmup_iters, self.warmup_factor)
        # Past the end the poly base would go negative; the schedule stays at its final value.
        poly = math.pow(max(1.0 - it / self.max_iter, 0.0), self.power)
        if self.constant_ending > 0 and factor == 1.0 and poly < self.constant_ending:
            return self.constant_ending
        return factor * poly

    def __call__(self, where: float) -> float:
        return self.value_at_iter(where * self.max_iter)


class TF2WarmupPolyParamScheduler(WarmupPolyParamScheduler):
    """kMaX-DeepLab's ``TF2WarmupPolyLR`` (DeepLab2's TF schedule), as a multiplier: the warmup
    factor alone during warmup, then ``(1 - it / max_iter) ** power`` (warmup is a phase; the
    multiplier jumps from about 1 to the poly value where it ends), with the same constant ending."""

    def value_at_iter(self, it: Union[int, float]) -> float:
        if it < self.warmup_iters:
            return warmup_factor_at_iter(self.warmup_method, it, self.warmup_iters, self.warmup_factor)
        poly = math.pow(max(1.0 - it / self.max_iter, 0.0), self.power)
        return self.constant_ending if 0 < self.constant_ending and poly < self.constant_ending else poly


class WarmupParamScheduler(CompositeParamScheduler):
    """``scheduler`` preceded by a warmup phase covering the first ``warmup_length`` of training.

    Linear warmup goes from ``warmup_factor * scheduler(0)`` to the value ``scheduler`` has where
    warmup ends (``scheduler(0)`` with ``rescale_interval``, in which case the main schedule is
    stretched over the remaining interval instead of being evaluated at absolute positions).
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
        rescale_interval: bool = False,
    ):
        start = warmup_factor * scheduler(0.0)
        end = scheduler(0.0) if rescale_interval else scheduler(warmup_length)
        if warmup_method == "linear":
            warmup: ParamScheduler = LinearParamScheduler(start, end)
        elif warmup_method == "constant":
            warmup = ConstantParamScheduler(start)
        else:
            raise ValueError(f"SOLVER.WARMUP_METHOD = {warmup_method!r}; expected one of {_WARMUP_METHODS}")
        super().__init__(
            [warmup, scheduler],
            lengths=[warmup_length, 1.0 - warmup_length],
            interval_scaling=["rescaled", "rescaled" if rescale_interval else "fixed"],
        )


class LRMultiplier(_TorchLRScheduler):
    """Sets every param group's lr to ``initial_lr * multiplier(iteration)``.

    Call :meth:`step` once after each ``optimizer.step()``; ``last_epoch`` counts iterations.
    Only ``last_epoch`` and ``base_lrs`` are saved: the multiplier is rebuilt from the config.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler, max_iter: int,
                 last_iter: int = -1):
        if not isinstance(multiplier, ParamScheduler):
            raise TypeError(f"multiplier must be an fvcore ParamScheduler, got {type(multiplier).__name__}")
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}")
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        super().__init__(optimizer, last_epoch=last_iter)

    def multiplier_at(self, it: int) -> float:
        it = min(max(int(it), 0), self._max_iter)
        if hasattr(self._multiplier, "value_at_iter"):
            return float(self._multiplier.value_at_iter(it))
        return float(self._multiplier(it / self._max_iter))

    def _values(self) -> List[float]:
        m = self.multiplier_at(self.last_epoch)
        return [base_lr * m for base_lr in self.base_lrs]

    def get_lr(self) -> List[float]:
        return self._values()

    def state_dict(self) -> Dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": int(self.last_epoch)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
        if len(self.base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"scheduler state has {len(self.base_lrs)} learning rates but the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups"
            )
        # Put the optimizer on the restored schedule now rather than at the next step().
        for group, lr in zip(self.optimizer.param_groups, self._values()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def TF2WarmupPolyLR(optimizer: torch.optim.Optimizer, max_iters: int, warmup_factor: float = 0.001,
                    warmup_iters: int = 1000, warmup_method: str = "linear", last_epoch: int = -1,
                    power: float = 0.9, constant_ending: float = 0.0) -> LRMultiplier:
    """kMaX-DeepLab's scheduler under its name and arguments (SOLVER.LR_SCHEDULER_NAME "TF2WarmupPolyLR")."""
    sched = TF2WarmupPolyParamScheduler(max_iters, power=power, constant_ending=constant_ending,
                                        warmup_factor=warmup_factor, warmup_iters=warmup_iters,
                                        warmup_method=warmup_method)
    return LRMultiplier(optimizer, sched, max_iters, last_iter=last_epoch)
