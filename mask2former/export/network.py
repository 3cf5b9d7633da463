"""What is exported: the network of a built meta architecture, from the normalised, padded image
batch to the head outputs, and the input sizes one exported file serves.

:class:`ExportNetwork` wraps ``model.predict_padded`` (every meta architecture has it: MaskFormer,
SeMaskMaskFormer, kMaXDeepLab): images (N, 3, H, W) float32 -> (pred_logits (N, Q, K+1),
pred_masks (N, Q, H/4, W/4)). Normalising, padding and the tasks' post-processing stay outside,
in the model's own code (:mod:`mask2former.export.runtime` calls it around the exported network).

:func:`input_spec` gives the example input and the dynamic dimensions: batch and, for Mask2Former
and its descendants, height and width as multiples of the model's size divisibility (what
``MaskFormer.inference`` pads to); kMaX-DeepLab runs at one size, INPUT.IMAGE_SIZE, so only the
batch is dynamic.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["ExportError", "ExportNetwork", "InputSpec", "input_spec", "OUTPUT_NAMES", "INPUT_NAME", "MAX_SIDE",
           "MAX_BATCH"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_masks")
# the largest side (pixels) and batch an exported file accepts; torch.export needs bounds to reason about sizes
MAX_SIDE = 8192
MAX_BATCH = 256


class ExportError(RuntimeError):
    """A model or config that cannot be exported, with what does not export and why."""


class ExportNetwork(nn.Module):
    """``model.predict_padded`` as a module with tensor outputs. Keys: ``model.*`` (the wrapped
    model's own keys behind the prefix)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "predict_padded", None)):
            raise ExportError(f"{type(model).__name__} has no predict_padded(images) method: only the meta "
                              "architectures of this package (MaskFormer, SeMaskMaskFormer, kMaXDeepLab) export")
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.model.predict_padded(images)
        return out["pred_logits"], out["pred_masks"]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The traced example (batch 2: torch.export fixes a dimension seen as 1) and the dynamic
    dimensions of the input ``images`` in torch.export's ``dynamic_shapes`` form."""

    example: torch.Tensor
    dynamic_shapes: Tuple[Dict[int, Any], ...]
    divisibility: int  # height and width must be multiples of it (0: fixed at fixed_size)
    fixed_size: Optional[Tuple[int, int]]  # kMaX: the one size the network runs at


def _round_up(x: int, d: int) -> int:
    return -(-x // d) * d


def input_spec(model: nn.Module, height: Optional[int] = None, width: Optional[int] = None) -> InputSpec:
    """Example input and dynamic dimensions of ``model`` (see the module docstring). ``height`` /
    ``width``: the traced example's size (rounded up to the divisibility), 512 by default."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    channels = int(model.pixel_mean.shape[0])
    fixed = getattr(model, "input_size", None)  # kMaX-DeepLab: INPUT.IMAGE_SIZE
    if fixed is not None:
        fixed = (int(fixed[0]), int(fixed[1]))
        if (height is not None and height != fixed[0]) or (width is not None and width != fixed[1]):
            raise ExportError(f"{type(model).__name__} runs at one input size, INPUT.IMAGE_SIZE {list(fixed)}; "
                              f"got --height {height} --width {width}")
        example = torch.zeros(2, channels, *fixed, device=model.device)
        return InputSpec(example, ({0: batch},), 0, fixed)
    d = max(int(model.size_divisibility), 1)
    if d == 1:
        raise ExportError(
            f"MODEL.MASK_FORMER.SIZE_DIVISIBILITY {model.size_divisibility} pads nothing: every input size would need "
            "its own graph. Export with SIZE_DIVISIBILITY -1 (the backbone's, 32) or a multiple of 32; the model then "
            "pads inputs to it, as the official configs do")
    h, w = _round_up(height or 512, d), _round_up(width or 512, d)
    if max(h, w) > MAX_SIDE:
        raise ExportError(f"the example size {h}x{w} exceeds the largest exported side, {MAX_SIDE}")
    rows = torch.export.Dim("height_blocks", min=1, max=MAX_SIDE // d)
    cols = torch.export.Dim("width_blocks", min=1, max=MAX_SIDE // d)
    example = torch.zeros(2, channels, h, w, device=model.device)
    return InputSpec(example, ({0: batch, 2: d * rows, 3: d * cols},), d, None)
