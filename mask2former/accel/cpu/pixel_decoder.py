"""MSDeformAttn pixel-decoder inference on the CPU. Same bits as ``modeling/pixel_decoder/``.

* ``FastMSDeformAttn``: the sampling locations ``reference + offset / (W, H)`` are computed inside
  the compiled kernel (``ops.ms_deform_attn_from_offsets``: the same IEEE division and addition
  per sample) instead of being materialised as a tensor of N*Lq*M*L*P*2 floats.
* ``FastMSDeformAttnEncoderLayer``: the FFN's hidden activations, (N*S, d_ffn) floats (80 MB at
  800x1216), go to a scratch buffer that all encoder layers share and that is kept between calls
  (``scratch.py``: a fresh allocation that size page-faults in on every call).
* ``FastMSDeformAttnPixelDecoder``: the FPN's bilinear upsampling of the encoder output, a
  channels-last view of its tokens, is written channels-last into a scratch buffer (torch would
  compute it channels-last and then spend ~25x the interpolation's time converting it to NCHW),
  and added into the NCHW lateral two image rows at a time (:func:`add_across_layouts_`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...layers.ms_deform_attn import MSDeformAttn
from ...modeling.pixel_decoder.msdeformattn import MSDeformAttnEncoderLayer, MSDeformAttnPixelDecoder
from ...ops import ms_deform_attn_from_offsets
from ..core import accelerates, inference_active, scratch_owner
from .scratch import scratch_buffer

__all__ = ["upsample_bilinear_channels_last", "add_across_layouts_"]


@accelerates(MSDeformAttn)
class FastMSDeformAttn(MSDeformAttn):
    def sample(self, value, spatial_shapes, level_start_index, reference_points, offsets, weights):
        if not inference_active(self):
            return super().sample(value, spatial_shapes, level_start_index, reference_points, offsets, weights)
        # runs the compiled op where its own conditions hold (CPU, one dtype), else the plain sum
        return ms_deform_attn_from_offsets(value, spatial_shapes, level_start_index, reference_points, offsets,
                                           weights)


def _scratch_allowed(module, x: torch.Tensor) -> bool:
    # a buffer kept between calls must not escape into autograd graphs or traced programs
    return inference_active(module) and x.device.type == "cpu" and not torch.compiler.is_compiling()


class _LinearInto:
    """``linear(x)`` written into ``out`` (the addmm F.linear runs for a contiguous input with a
    bias): same bits, no fresh allocation."""

    def __init__(self, linear: torch.nn.Linear, out: torch.Tensor):
        self.linear, self.out = linear, out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.linear.bias, x.view(-1, x.shape[-1]), self.linear.weight.t(), out=self.out)
        return h.view(*x.shape[:-1], h.shape[-1])


@accelerates(MSDeformAttnEncoderLayer)
class FastMSDeformAttnEncoderLayer(MSDeformAttnEncoderLayer):
    def forward_ffn(self, src, linear1=None):
        if linear1 is not None or self.linear1.bias is None or not src.is_contiguous() \
                or not _scratch_allowed(self, src):
            return super().forward_ffn(src, linear1)
        tokens = src.numel() // src.shape[-1]
        hidden = scratch_buffer(scratch_owner(self), "msdeformattn_encoder_ffn_hidden",
                                (tokens, self.linear1.out_features), src)
        return super().forward_ffn(src, _LinearInto(self.linear1, hidden))


def upsample_bilinear_channels_last(x: torch.Tensor, size: Sequence[int], out: torch.Tensor = None) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for a channels-innermost x
    (N, C, H, W), the same values, written channels-last (into ``out``, (N, h, w, C) memory, when
    given)."""
    size = tuple(int(v) for v in size)
    if out is None:
        out = torch.empty((x.shape[0], x.shape[1], *size), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    return torch.ops.aten.upsample_bilinear2d.out(x, size, False, None, None, out=out)


def add_across_layouts_(out: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """out += other, for an NCHW ``out`` and a channels-last ``other`` (N, C, H, W). In one
    sweep each element of ``other`` lies on a cache line that was evicted long before its
    neighbouring channels are read; two image rows at a time keep those lines in cache (~3x
    faster at 256x200x304). Same elementwise sums."""
    if out.dim() != 4 or not out.is_contiguous() or other.is_contiguous() or other.shape != out.shape:
        return out.add_(other)
    for r in range(0, out.shape[2], 2):
        out[:, :, r: r + 2].add_(other[:, :, r: r + 2])
    return out


@accelerates(MSDeformAttnPixelDecoder)
class FastMSDeformAttnPixelDecoder(MSDeformAttnPixelDecoder):
    def fpn_merge(self, idx, x, top):
        channels_innermost = top.dim() == 4 and top.shape[1] > 1 and top.stride(1) == 1 and not top.is_contiguous()
        if not (channels_innermost and _scratch_allowed(self, top)):
            return super().fpn_merge(idx, x, top)
        lat = self.lateral_convs[idx](x)
        n, c = top.shape[:2]
        h, w = lat.shape[-2:]
        buf = scratch_buffer(scratch_owner(self), f"fpn_upsampled_{idx}", (n, h, w, c), top).permute(0, 3, 1, 2)
        up = upsample_bilinear_channels_last(top, (h, w), out=buf)
        # in place into the fresh lateral output: the sum keeps its NCHW layout, which the output
        # conv then sees as in the plain path
        return self.output_convs[idx](add_across_layouts_(lat, up))
