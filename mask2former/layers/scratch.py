"""Scratch buffers that inference keeps between calls.

A fresh CPU allocation of tens of MB comes straight from the OS (glibc serves anything over
32 MB with mmap and unmaps it on free), and each of its 4 KiB pages faults in on first touch:
about 20k faults per 80 MB, which cost ~35 ms here (virtual machines make faults dear).
Temporaries of that size that die within one call can instead be written into a buffer the
module keeps, whose pages are already mapped.
"""
import threading
from typing import Sequence

import torch
from torch import nn

__all__ = ["scratch_buffer"]


def scratch_buffer(module: nn.Module, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``shape`` with ``like``'s dtype and device, kept on ``module`` for
    the next call (one per thread and per inference-mode state: inference tensors cannot be
    written outside inference mode). Its contents are garbage; it must not outlive the call."""
    store = module.__dict__.setdefault("_scratch_buffers", {})
    key = (name, threading.get_ident(), torch.is_inference_mode_enabled())
    buf = store.get(key)
    shape = tuple(int(s) for s in shape)
    if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = store[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf
