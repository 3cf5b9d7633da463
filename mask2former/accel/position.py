"""Sine position encodings without a padding mask, kept per map size.

Without a mask the encoding depends on the map's (H, W) only, yet the plain module computes it
for every level of every forward. Here it is computed once per size, device and inference-mode
state (inference tensors cannot be used outside inference mode), at most ``CACHE_SIZE`` sizes,
and returned expanded over the batch: the same values, as a read-only view.
"""
from __future__ import annotations

import collections
import threading

import torch

from ..layers.position_encoding import PositionEmbeddingSine
from .core import module_state, accelerates, inference_active

__all__ = ["FastPositionEmbeddingSine", "CACHE_SIZE"]

CACHE_SIZE = 8
_lock = threading.Lock()


@accelerates(PositionEmbeddingSine)
class FastPositionEmbeddingSine(PositionEmbeddingSine):
    def forward(self, x, mask=None):
        if mask is not None or not inference_active(self) or torch.compiler.is_compiling():
            return super().forward(x, mask)
        n, _, h, w = x.shape
        key = (h, w, x.device, torch.is_inference_mode_enabled())
        with _lock:
            cache = module_state(self).setdefault("encodings", collections.OrderedDict())
            pos = cache.pop(key, None)
        if pos is None:
            pos = self._encode(torch.zeros((1, h, w), device=x.device, dtype=torch.bool))
        with _lock:
            cache[key] = pos  # most recently used last
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return pos.expand(n, -1, -1, -1)
