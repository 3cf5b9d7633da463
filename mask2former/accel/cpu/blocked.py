"""oneDNN channel-blocked activations for CPU inference.

torch runs CPU float32 convolutions as oneDNN kernels on a channel-blocked layout (nChw16c with
AVX-512, nChw8c with AVX2: channel cb * B + j of pixel (h, w) at [n, cb, h, w, j]). Given NCHW
tensors, every convolution reorders its input into that layout and its output back: two copies
of each activation, about a quarter of a ResNet-50's convolution time at 800x1216. An opaque
``Tensor.to_mkldnn()`` tensor keeps the blocked layout from one convolution to the next, which
runs the same kernel and so gives the same bits without the copies. The elementwise work in
between (frozen batch norm, residual add, ReLU) runs on ``blocked_view``, a dense view of the
opaque tensor's memory.

Callers must verify their results against the NCHW path (``ResNet`` does, once per input
size), since the layout oneDNN picks is its own choice.
"""
import ctypes
import functools
from typing import Optional

import torch
from torch.nn import functional as F

__all__ = ["block_size", "blocked_view"]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Flat float32 view of an opaque tensor's memory (t must outlive it)."""
    if torch.ops.mkldnn._nbytes(t) != t.numel() * 4:
        raise ValueError(f"opaque tensor of shape {tuple(t.shape)} is padded in memory; expected a dense block layout")
    buf = (ctypes.c_float * t.numel()).from_address(torch.ops.mkldnn.data_ptr(t))
    return torch.frombuffer(buf, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def block_size() -> Optional[int]:
    """Channels per block of oneDNN's convolution outputs here (16 or 8), found by running one
    small convolution; None when opaque tensors or their memory are not available."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "data_ptr")
            and hasattr(torch.ops.mkldnn, "_nbytes")):
        return None
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 32, 5, 6, generator=g), torch.randn(64, 32, 3, 3, generator=g)
    with torch.no_grad():
        try:
            out = torch.mkldnn_convolution(x.to_mkldnn(), w, None, [1, 1], [1, 1], [1, 1], 1)
            raw = _raw(out).clone()
        except (RuntimeError, ValueError, AttributeError):
            return None
        plain = F.conv2d(x, w, padding=1)
    # the layout only: rounding may differ (oneDNN may pick another kernel for a small input)
    for b in (16, 8):
        if torch.allclose(raw, plain.unflatten(1, (64 // b, b)).permute(0, 1, 3, 4, 2).flatten(), rtol=1e-4, atol=1e-3):
            return b
    return None


def blocked_view(t: torch.Tensor) -> torch.Tensor:
    """Opaque (N, C, H, W) tensor -> dense (N, C/B, H, W, B) view of its memory, B =
    block_size(). Writes go to t; t must stay alive while the view is used."""
    b = block_size()
    n, c, h, w = t.shape
    if b is None or c % b:
        raise ValueError(f"no channel-blocked view of an opaque tensor with {c} channels (block size {b})")
    return _raw(t).view(n, c // b, h, w, b)
