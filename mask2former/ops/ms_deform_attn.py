"""Multi-scale deformable attention (Deformable DETR), pure-PyTorch reference.

Shape legend:
    N  batch size            S  sum over levels of H_l * W_l (flattened value length)
    M  attention heads       D  channels per head
    Lq number of queries     L  feature levels          P  sampling points per level

``ms_deform_attn`` runs the compiled operator ``torch.ops.mask2former.ms_deform_attn`` (C++ CPU
kernel; CUDA kernel when built, see ``backend/``) when available, else
``ms_deform_attn_reference``, the plain implementation every fast path is tested against. Both
paths support autograd.

``ms_deform_attn_from_offsets`` is the entry point ``MSDeformAttn`` calls: it takes reference
points and per-level pixel offsets instead of locations. Without autograd on CPU it runs the
inference-only ``mask2former::ms_deform_attn_offsets``, which computes each location inside the
kernel (bitwise the same result, without two (N, Lq, M, L, P, 2) temporaries); otherwise it
computes the locations with torch (``sampling_locations_from_offsets``) and calls
``ms_deform_attn``.

``spatial_shapes`` is an (L, 2) int tensor, or a sequence of L (H, W) pairs (then
``level_start_index`` may be None): the pixel decoder passes the sequence, whose sizes stay
symbolic under ``torch.export`` (a tensor's values would be data), so the reference can slice
each level without reading tensor data and an exported graph serves every input size.
``reference_kernels()`` makes every call in its scope run the reference (the ONNX export
decomposes the op into ``grid_sample`` that way).
"""
import contextlib
import contextvars
from typing import List, Sequence, Tuple, Union

import torch
from torch.nn import functional as F

from .backend import state

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "check_ms_deform_attn_inputs",
    "check_ms_deform_attn_shapes",
    "check_ms_deform_attn_offsets_shapes",
    "ms_deform_attn_from_offsets",
    "sampling_locations_from_offsets",
    "level_shapes_tensor",
    "level_start_tensor",
    "reference_kernels",
]

_FORCE_REFERENCE = contextvars.ContextVar("m2f_ms_deform_attn_reference", default=False)


@contextlib.contextmanager
def reference_kernels():
    """Run ``ms_deform_attn`` / ``ms_deform_attn_from_offsets`` as the PyTorch reference in this
    scope, even where a compiled kernel exists (what an ONNX export traces)."""
    token = _FORCE_REFERENCE.set(True)
    try:
        yield
    finally:
        _FORCE_REFERENCE.reset(token)


def level_shapes_tensor(sizes: Sequence[Tuple[int, int]], device=None) -> torch.Tensor:
    """(L, 2) int64 tensor of the (H, W) ``sizes``. Built from 0-d tensors, so that sizes that are
    symbolic under torch.export stay symbolic (``torch.as_tensor`` would fix them to the example's)."""
    return torch.stack([torch.stack([torch.scalar_tensor(h, dtype=torch.int64, device=device),
                                     torch.scalar_tensor(w, dtype=torch.int64, device=device)]) for h, w in sizes])


def level_start_tensor(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L,) offset of each level in the flattened (S) axis of an (L, 2) ``spatial_shapes``."""
    return torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))


SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def _level_tensors(spatial_shapes: SpatialShapes, level_start_index, device):
    """(spatial_shapes, level_start_index) as tensors, from either form of ``spatial_shapes``."""
    if isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes, level_start_index
    shapes = level_shapes_tensor(spatial_shapes, device)
    return shapes, level_start_tensor(shapes) if level_start_index is None else level_start_index


def _level_sizes(spatial_shapes: SpatialShapes, level_start_index) -> Tuple[List[Tuple[int, int]], List[int]]:
    """Python (H, W) per level and its offset in S, without reading tensor data for a sequence."""
    if isinstance(spatial_shapes, torch.Tensor):
        sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        return sizes, [int(s) for s in level_start_index.tolist()]
    sizes = [(h, w) for h, w in spatial_shapes]
    starts, total = [], 0
    for h, w in sizes:
        starts.append(total)
        total = total + h * w
    return sizes, starts

# dtypes the compiled kernels implement, per device type; others run the reference.
_COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def check_ms_deform_attn_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Validate ranks, sizes and dtypes without reading tensor data (usable on fake tensors and
    under torch.compile); raise ValueError naming the offending argument."""
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  "sampling_locations")


def check_ms_deform_attn_offsets_shapes(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
):
    """``check_ms_deform_attn_shapes`` for the arguments of ``mask2former::ms_deform_attn_offsets``:
    sampling_offsets (N, Lq, M, L, P, 2) take the place of the locations, and reference_points
    must be (N, Lq, L, 2) (any strides) of value's dtype and device. Raises ValueError naming the
    offending argument."""
    _check_shapes(value, spatial_shapes, level_start_index, sampling_offsets, attention_weights, "sampling_offsets")
    n, lq, _, nl, _, _ = sampling_offsets.shape
    if tuple(reference_points.shape) != (n, lq, nl, 2):
        raise ValueError(
            f"reference_points must be (N, Lq, L, 2) = {(n, lq, nl, 2)}; got shape {tuple(reference_points.shape)}"
        )
    if reference_points.dtype != value.dtype or reference_points.device != value.device:
        raise ValueError(
            f"reference_points must have value's dtype and device ({value.dtype}, {value.device}); "
            f"got {reference_points.dtype}, {reference_points.device}"
        )


def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, loc_name):
    # loc_name: what the caller calls its (N, Lq, M, L, P, 2) argument, for the messages
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D); got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2); got shape {tuple(spatial_shapes.shape)}")
    if level_start_index.dim() != 1 or level_start_index.shape[0] != spatial_shapes.shape[0]:
        raise ValueError(
            f"level_start_index must be (L,) with L={spatial_shapes.shape[0]}; "
            f"got shape {tuple(level_start_index.shape)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"{loc_name} must be (N, Lq, M, L, P, 2); got shape {tuple(sampling_locations.shape)}")
    if attention_weights.dim() != 5:
        raise ValueError(
            f"attention_weights must be (N, Lq, M, L, P); got shape {tuple(attention_weights.shape)}"
        )
    n, s, m, _ = value.shape
    n2, lq, m2, nl, p, _ = sampling_locations.shape
    if (n2, m2, nl) != (n, m, spatial_shapes.shape[0]):
        raise ValueError(
            f"{loc_name} {tuple(sampling_locations.shape)} disagrees with value "
            f"{tuple(value.shape)} / spatial_shapes (L={spatial_shapes.shape[0]}) in N, M or L"
        )
    if tuple(attention_weights.shape) != (n, lq, m, nl, p):
        raise ValueError(
            f"attention_weights must have shape {(n, lq, m, nl, p)}; got {tuple(attention_weights.shape)}"
        )
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise ValueError(
            f"value, {loc_name} and attention_weights must share a dtype; got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    if not (value.device == sampling_locations.device == attention_weights.device):
        raise ValueError(
            f"value, {loc_name} and attention_weights must be on one device; got "
            f"{value.device}, {sampling_locations.device}, {attention_weights.device}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device.type != "cpu" and t.device != value.device:
            raise ValueError(f"{name} must be on the CPU or on {value.device} (the device of value); got {t.device}")


def check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """``check_ms_deform_attn_shapes`` plus the check that the level sizes sum to S, which reads
    ``spatial_shapes`` and is therefore skipped while torch.compile / torch.export trace (the
    compiled kernel checks it again at run time)."""
    check_ms_deform_attn_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.compiler.is_compiling():
        return
    _check_level_sizes(value, spatial_shapes)


def _check_level_sizes(value, spatial_shapes):
    s = value.shape[1]
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if total != s:
        raise ValueError(f"value has S={s} positions but spatial_shapes sum to {total}")


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Bilinear sampling of each level with ``grid_sample`` (zero padding, align_corners=False).

    value (N, S, M, D); spatial_shapes (L, 2) int64 as (H, W), or L (H, W) pairs;
    level_start_index (L,) (ignored for pairs); sampling_locations (N, Lq, M, L, P, 2) normalised
    (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P). Returns (N, Lq, M*D).
    """
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = sampling_locations.shape
    sizes, starts = _level_sizes(spatial_shapes, level_start_index)
    # grid_sample wants coordinates in [-1, 1]
    grids = sampling_locations * 2 - 1
    sampled = []
    for lvl, (h, w) in enumerate(sizes):
        v = value[:, starts[lvl]: starts[lvl] + h * w]  # (N, HW, M, D)
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L, P) weighted over L*P
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, nl * p)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention; see the module docstring for shapes.

    Dispatches to the compiled operator for tensors of a device and dtype it has a kernel for
    (CPU: float32 / float64; CUDA: also float16 / bfloat16), building it on first use, else to
    the reference. Non-contiguous inputs are made contiguous here (the raw
    ``torch.ops.mask2former.ms_deform_attn`` requires them to be).

    The check that the level sizes sum to S reads ``spatial_shapes``; when that tensor lives on
    the GPU and the compiled CUDA kernel takes the call, the check is skipped, as it would cost
    a device-to-host copy and a stream synchronisation per call. The kernel never reads outside
    ``value``: it treats a level that does not fit inside S as empty.
    """
    sizes = spatial_shapes
    spatial_shapes, level_start_index = _level_tensors(spatial_shapes, level_start_index, value.device)
    check_ms_deform_attn_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device_type = value.device.type
    compiled = (value.dtype in _COMPILED_DTYPES.get(device_type, ()) and not _FORCE_REFERENCE.get()
                and state.compiled_available(device_type))
    if not torch.compiler.is_compiling() and not (compiled and spatial_shapes.device.type == "cuda"):
        _check_level_sizes(value, spatial_shapes)
    if compiled:
        if spatial_shapes.dtype != torch.int64:
            spatial_shapes = spatial_shapes.to(torch.int64)
        if level_start_index.dtype != torch.int64:
            level_start_index = level_start_index.to(torch.int64)
        return torch.ops.mask2former.ms_deform_attn(
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
        )
    if not isinstance(sizes, torch.Tensor):  # the pairs: no tensor data read, even while exporting
        spatial_shapes, level_start_index = sizes, None
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def sampling_locations_from_offsets(reference_points, sampling_offsets, spatial_shapes):
    """The plain computation of the sampling locations: ``reference_points`` (N, Lq, L, 2), or
    broadcastable to it, plus ``sampling_offsets`` (N, Lq, M, L, P, 2) in pixels of each level
    divided by the level's (W, H). Returns (N, Lq, M, L, P, 2).

    The level sizes are converted to the promoted dtype of the two inputs, which is that of the
    query the offsets were predicted from (in float32 even when autocast made the offsets
    float16 / bfloat16: a size like 304 has no exact bfloat16)."""
    dtype = torch.promote_types(sampling_offsets.dtype, reference_points.dtype)
    if not isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = level_shapes_tensor(spatial_shapes, sampling_offsets.device)
    normalizer = spatial_shapes.flip(-1).to(device=sampling_offsets.device, dtype=dtype)
    return reference_points[:, :, None, :, None, :] + sampling_offsets / normalizer[None, None, None, :, None, :]


def _uses_offsets_op(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                     attention_weights) -> bool:
    """Whether ``ms_deform_attn_from_offsets`` can run ``mask2former::ms_deform_attn_offsets``:
    CPU tensors of one compiled dtype, no autograd (the op has none), and the compiled kernel."""
    dtype = value.dtype
    if dtype not in _COMPILED_DTYPES["cpu"] or _FORCE_REFERENCE.get():
        return False
    for t in (value, reference_points, sampling_offsets, attention_weights):
        if t.device.type != "cpu" or t.dtype != dtype:
            return False
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (spatial_shapes, level_start_index)):
        return False
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, reference_points, sampling_offsets, attention_weights)
    ):
        return False
    return state.compiled_available("cpu")


def ms_deform_attn_from_offsets(
    value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights, fused=True
):
    """``ms_deform_attn`` at the locations ``sampling_locations_from_offsets(reference_points,
    sampling_offsets, spatial_shapes)``, bitwise equal to computing them with torch and calling
    ``ms_deform_attn``.

    value (N, S, M, D); spatial_shapes (L, 2) (H, W); level_start_index (L,);
    reference_points (N, Lq, L, 2) normalised (x, y), or broadcastable to it (an expanded view
    costs nothing); sampling_offsets (N, Lq, M, L, P, 2) in pixels of each level;
    attention_weights (N, Lq, M, L, P). Returns (N, Lq, M*D).

    CPU float32 / float64 inputs of one dtype without autograd (grad mode off, or no input
    requires grad) run ``mask2former::ms_deform_attn_offsets`` when it is compiled: it divides
    and adds per sample inside the kernel, with torch's rounding (an IEEE division, then an
    addition), instead of materialising the locations. Everything else, and ``fused=False``,
    computes the locations with torch.
    """
    if fused and _uses_offsets_op(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                                  attention_weights):
        spatial_shapes, level_start_index = _level_tensors(spatial_shapes, level_start_index, value.device)
        reference_points = _broadcast_reference_points(reference_points, sampling_offsets)
        check_ms_deform_attn_offsets_shapes(
            value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
        )
        if not torch.compiler.is_compiling():
            _check_level_sizes(value, spatial_shapes)
        return torch.ops.mask2former.ms_deform_attn_offsets(
            value.contiguous(),
            spatial_shapes.to(torch.int64).contiguous(),
            level_start_index.to(torch.int64).contiguous(),
            reference_points,  # any strides: the kernel indexes it with them
            sampling_offsets.contiguous(),
            attention_weights.contiguous(),
        )
    locations = sampling_locations_from_offsets(reference_points, sampling_offsets, spatial_shapes)
    return ms_deform_attn(value, spatial_shapes, level_start_index, locations, attention_weights)


def _broadcast_reference_points(reference_points, sampling_offsets):
    """reference_points expanded to (N, Lq, L, 2) where it broadcasts to that shape (the torch
    path broadcasts it); anything else is returned as is, for the shape check to reject."""
    if reference_points.dim() != 4 or sampling_offsets.dim() != 6:
        return reference_points
    n, lq, _, nl, _, two = sampling_offsets.shape
    target = (n, lq, nl, two)
    if all(r in (1, t) for r, t in zip(reference_points.shape, target)):
        return reference_points.expand(target)
    return reference_points
