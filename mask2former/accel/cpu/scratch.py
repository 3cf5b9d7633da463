"""Scratch buffers that inference keeps between calls.

A fresh CPU allocation of tens of MB comes straight from the OS (glibc serves anything over
32 MB with mmap and unmaps it on free), and each of its 4 KiB pages faults in on first touch:
about 20k faults per 80 MB, which cost ~35 ms here (virtual machines make faults dear).
Temporaries of that size that die within one call can instead be written into a buffer the
module keeps, whose pages are already mapped.
"""
import threading
import weakref
from typing import Sequence

import torch
from torch import nn

__all__ = ["scratch_buffer"]

# module -> threading.local holding its buffers: kept off the module itself, so copying or
# pickling a module never carries them, and dropped with the module
_per_module: "weakref.WeakKeyDictionary[nn.Module, threading.local]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def scratch_buffer(module: nn.Module, name: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``shape`` with ``like``'s dtype and device, kept on ``module`` for
    the next call (one per thread, released when the thread ends, and per inference-mode state:
    inference tensors cannot be written outside inference mode). Its contents are garbage; it
    must not outlive the call."""
    with _lock:
        local = _per_module.get(module)
        if local is None:
            local = _per_module[module] = threading.local()
    store = local.__dict__.setdefault("buffers", {})
    key = (name, torch.is_inference_mode_enabled())
    buf = store.get(key)
    shape = tuple(int(s) for s in shape)
    if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = store[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf
