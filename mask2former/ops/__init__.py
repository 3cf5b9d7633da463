"""Custom operators. ``ms_deform_attn`` runs compiled kernels when they can be built (see
``_extension``; ``python -m mask2former.ops info``) and the PyTorch reference otherwise."""
from ._extension import BackendInfo, backend_info, build
from .ms_deform_attn import (
    check_ms_deform_attn_inputs,
    check_ms_deform_attn_shapes,
    ms_deform_attn,
    ms_deform_attn_reference,
)

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "check_ms_deform_attn_inputs",
    "check_ms_deform_attn_shapes",
    "backend_info",
    "build",
    "BackendInfo",
]
