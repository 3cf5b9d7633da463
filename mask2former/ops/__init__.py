"""Custom operators. ``ms_deform_attn`` runs compiled kernels when they can be built (see
``_extension``; ``python -m mask2former.ops info``) and the PyTorch reference otherwise;
``ms_deform_attn_from_offsets`` (what ``MSDeformAttn`` calls) adds the offsets to the reference
points inside an inference-only CPU kernel, bitwise as torch would;
``frozen_bn_act`` (inference FrozenBatchNorm2d + residual + ReLU) runs its compiled CPU kernel
only where that reproduces the reference bitwise."""
from ._extension import BackendInfo, backend_info, build
from .frozen_bn import frozen_bn_act, frozen_bn_act_compiled, frozen_bn_act_reference, frozen_bn_act_uses_compiled
from .ms_deform_attn import (
    check_ms_deform_attn_inputs,
    check_ms_deform_attn_offsets_shapes,
    check_ms_deform_attn_shapes,
    ms_deform_attn,
    ms_deform_attn_from_offsets,
    ms_deform_attn_reference,
    sampling_locations_from_offsets,
)

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "check_ms_deform_attn_inputs",
    "check_ms_deform_attn_shapes",
    "check_ms_deform_attn_offsets_shapes",
    "ms_deform_attn_from_offsets",
    "sampling_locations_from_offsets",
    "frozen_bn_act",
    "frozen_bn_act_reference",
    "frozen_bn_act_compiled",
    "frozen_bn_act_uses_compiled",
    "backend_info",
    "build",
    "BackendInfo",
]
