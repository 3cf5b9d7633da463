"""Inference FrozenBatchNorm2d, optionally fused with a residual add and a ReLU.

``frozen_bn_act`` computes, for x of shape (N, C, H, W) and per-channel (C,) statistics,

    y = batch_norm(x, running_mean, running_var, weight, bias, eps)   (inference form)
    y = y + residual        if residual is given (same shape as x)
    y = relu(y)             if relu

bitwise equal to the plain sequence ``F.batch_norm``, ``+=``, ``relu_``
(``frozen_bn_act_reference``). For CPU float32 contiguous tensors without autograd it runs the
compiled ``mask2former::frozen_bn_act`` kernel, one pass over memory instead of three, but only
after a one-time check that the kernel reproduces torch's batch_norm bit for bit on this
machine: the kernel uses a fused multiply-add, as ATen's FMA builds do, and an ATen that rounds
differently (another CPU capability, another build) must not change results. Everything else
runs the reference.
"""
import logging
import os
from typing import Dict, Optional

import torch
from torch.nn import functional as F

from .backend import state

__all__ = [
    "frozen_bn_act",
    "frozen_bn_act_reference",
    "frozen_bn_act_compiled",
    "frozen_bn_act_uses_compiled",
    "check_frozen_bn_act_shapes",
]

logger = logging.getLogger(__name__)


def check_frozen_bn_act_shapes(x, weight, bias, running_mean, running_var, residual=None):
    """Validate ranks and sizes without reading data (works on fake tensors); raise ValueError
    naming the offending argument."""
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (N, C, H, W) or channel-blocked (N, C/B, H, W, B); got shape {tuple(x.shape)}")
    c = x.shape[1] * x.shape[4] if x.dim() == 5 else x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"{name} must be (C,) with C={c}; got shape {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got shape {tuple(residual.shape)}")


def frozen_bn_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """The plain path: ``F.batch_norm`` (inference), ``+= residual``, ``relu_``; x (N, C, H, W)
    or channel-blocked (N, C/B, H, W, B), statistics (C,). With ``inplace`` the result is copied
    into x, which is returned."""
    if x.dim() == 5:  # per element, so computing it in NCHW order gives the same bits
        c = x.shape[1] * x.shape[4]
        # into fresh NCHW storage: batch_norm's kernel choice (and rounding) follows the strides
        nchw = lambda t: t.new_empty(x.shape[0], c, *x.shape[2:4]).copy_(t.permute(0, 1, 4, 2, 3).flatten(1, 2))
        out = frozen_bn_act_reference(nchw(x), weight, bias, running_mean, running_var, eps,
                                      None if residual is None else nchw(residual), relu)
        out = out.unflatten(1, (x.shape[1], x.shape[4])).permute(0, 1, 3, 4, 2)
        return x.copy_(out) if inplace else out.contiguous()
    out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if residual is not None:
        out += residual
    if relu:
        out = F.relu_(out)
    return x.copy_(out) if inplace else out


# Per value of M2F_OPS_CPU_ISA (the kernel variant), whether the kernel matched the reference.
_self_check: Dict[str, bool] = {}


def _check_inputs():
    """Small tensors with what tends to break a bitwise match: planes with vector tails, of size
    1 and of a whole vector, signed zeros, subnormal and huge values, zero variances, negative
    and zero weights."""
    g = torch.Generator().manual_seed(0)
    cases = []
    # NCHW, and channel-blocked (N, C/B, H, W, B) as oneDNN lays out AVX-512 / AVX2 conv outputs
    for shape in ((2, 19, 5, 37), (1, 24, 1, 1), (1, 3, 16, 16), (2, 3, 3, 5, 16), (1, 3, 2, 7, 8), (1, 2, 3, 1, 4)):
        c = shape[1] * shape[4] if len(shape) == 5 else shape[1]
        x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 4)
        flat = x.view(-1)
        flat[::7] = 0.0
        flat[::11] = -0.0
        flat[1::13] = 3.0e38
        flat[2::17] = -1.0e-39
        weight = torch.randn(c, generator=g) * 3
        weight[::5] = 0.0
        bias = torch.randn(c, generator=g)
        bias[::3] = -0.0
        mean = torch.randn(c, generator=g) * 10
        var = torch.rand(c, generator=g) * torch.exp(torch.randn(c, generator=g) * 4)
        var[::4] = 0.0
        residual = torch.randn(shape, generator=g) * 5
        residual.view(-1)[::9] = -0.0
        cases.append((x, weight, bias, mean, var, residual))
    return cases


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _run_self_check() -> bool:
    with torch.no_grad():
        for x, weight, bias, mean, var, residual in _check_inputs():
            for eps in (1e-5, 1e-3):
                for res in (None, residual):
                    for relu in (False, True):
                        args = (weight, bias, mean, var, eps, res, relu)
                        want = frozen_bn_act_reference(x, *args)
                        got = torch.ops.mask2former.frozen_bn_act(x, *args)
                        got_ = x.clone()
                        torch.ops.mask2former.frozen_bn_act_(got_, *args)
                        if not (_same_bits(got, want) and _same_bits(got_, want)):
                            return False
    return True


@torch.compiler.assume_constant_result
def frozen_bn_act_compiled() -> bool:
    """Whether CPU float32 calls run the compiled kernel: it is built and, once per process
    (and kernel variant), matched the reference bitwise."""
    if not state.compiled_available("cpu") or not hasattr(torch.ops.mask2former, "frozen_bn_act"):
        return False
    key = os.environ.get("M2F_OPS_CPU_ISA", "")
    ok = _self_check.get(key)
    if ok is None:
        ok = _self_check[key] = _run_self_check()
        if not ok:
            logger.info(
                "mask2former.ops.frozen_bn_act: the compiled kernel does not reproduce torch's batch_norm "
                "bitwise on this machine (M2F_OPS_CPU_ISA=%r); using the reference", key
            )
    return ok


def frozen_bn_act_uses_compiled(x, weight, bias, running_mean, running_var, residual=None) -> bool:
    """Whether ``frozen_bn_act`` runs the compiled kernel for these arguments: all CPU float32
    contiguous, no autograd, and ``frozen_bn_act_compiled()``."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return False
    tensors = (weight, bias, running_mean, running_var) if residual is None else (
        weight, bias, running_mean, running_var, residual)
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    # The op has no autograd formula.
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
        return False
    return frozen_bn_act_compiled()


def frozen_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """``relu(batch_norm(x) + residual)`` with frozen statistics, bitwise equal to
    ``frozen_bn_act_reference``.

    Args:
        x: (N, C, H, W), or channel-blocked (N, C/B, H, W, B): channel cb * B + j at
            [n, cb, h, w, j] (oneDNN's nChw<B>c layout).
        weight, bias, running_mean, running_var: (C,).
        eps: added to running_var.
        residual: optional, x's shape and layout, added after the normalisation.
        relu: apply ReLU last (keeps NaN and -0.0, like ``torch.relu``).
        inplace: write the result into x and return x.
    Returns:
        x's shape and layout, a new tensor or x.
    """
    check_frozen_bn_act_shapes(x, weight, bias, running_mean, running_var, residual)
    if frozen_bn_act_uses_compiled(x, weight, bias, running_mean, running_var, residual):
        args = (weight, bias, running_mean, running_var, float(eps), residual, relu)
        if inplace:
            torch.ops.mask2former.frozen_bn_act_(x, *args)
            return x
        return torch.ops.mask2former.frozen_bn_act(x, *args)
    return frozen_bn_act_reference(x, weight, bias, running_mean, running_var, eps, residual, relu, inplace)
