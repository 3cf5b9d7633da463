"""MP-Former's mask-piloted (MP) queries (Zhang et al., CVPR 2023), built from the ground truth
in training only.

Query layout of a training step with MP: ``[MP group 0 | ... | MP group G-1 | Q matching queries]``.
Each group has ``group_size`` slots, the most objects of an image in the batch; in every group,
slot t of image b holds b's object t (t < T_b); the other slots are padding (zero content,
"no object" target, attending everywhere). An MP query's content is the class embedding of its
object's (label-noised) class; it attends, in cross-attention, to its object's (noised) ground-truth
mask at the level of each layer, and its outputs are trained to reconstruct the object without
matching. In self-attention the matching queries do not see MP queries, nor MP groups each other.

Bool masks here follow ``nn.MultiheadAttention``: True = not attended.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

# every DN_MODE of the official decoder, and those implemented here
OFFICIAL_MODES = ("base", "lb", "mask", "points", "shift", "scale", "shift_scale", "patch", "points_MAE")
IMPLEMENTED_MODES = ("points", "shift")

__all__ = ["OFFICIAL_MODES", "IMPLEMENTED_MODES", "MPLayout", "mp_layout", "self_attention_mask",
           "gt_attention_masks", "point_noise", "label_noise", "shift_noise", "mask_boxes", "level_masks_for_shift"]


@dataclass
class MPLayout:
    """Where the ground-truth objects sit among the MP slots. ``batch_index``, ``slot_index`` and
    ``object_index`` (M,), M = num_groups * objects in the batch, group-major then image-major:
    entry m is object ``object_index[m]`` of image ``batch_index[m]`` in slot ``slot_index[m]``
    (in [0, pad_size))."""

    num_groups: int
    group_size: int
    batch_index: torch.Tensor
    slot_index: torch.Tensor
    object_index: torch.Tensor

    @property
    def pad_size(self) -> int:
        return self.num_groups * self.group_size

    def matches(self, num_objects: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (MP slots, their objects): the direct assignment the losses use."""
        return [(self.slot_index[self.batch_index == b], self.object_index[self.batch_index == b])
                for b in range(len(num_objects))]


def mp_layout(num_objects: Sequence[int], num_dn: int, device=None) -> Optional[MPLayout]:
    """The MP slots for images with ``num_objects`` objects: ``num_dn`` groups (``num_dn >= 100``:
    a budget, ``num_dn // max(num_objects)`` groups). None when there is nothing to pilot."""
    group_size = max(num_objects, default=0)
    if group_size == 0 or num_dn <= 0:
        return None
    groups = num_dn // group_size if num_dn >= 100 else num_dn
    if groups == 0:
        return None
    batch = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(num_objects)])
    objects = torch.cat([torch.arange(n) for n in num_objects])
    slots = torch.cat([objects + g * group_size for g in range(groups)])
    return MPLayout(groups, group_size, batch.repeat(groups).to(device), slots.to(device),
                    objects.repeat(groups).to(device))


def self_attention_mask(layout: MPLayout, num_queries: int, device=None) -> torch.Tensor:
    """(P+Q, P+Q) bool, P = layout.pad_size: matching queries (the last Q) see no MP query; each MP
    group sees itself and the matching queries."""
    p, s = layout.pad_size, layout.group_size
    mask = torch.zeros(p + num_queries, p + num_queries, dtype=torch.bool, device=device)
    mask[p:, :p] = True
    group = torch.arange(p, device=device) // s
    mask[:p, :p] = group[:, None] != group[None, :]
    return mask


def gt_attention_masks(masks: Sequence[torch.Tensor], size: Tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Ground-truth masks (T_b, H, W) of every image -> (sum T_b, h*w) bool at ``size``, image-major,
    True = not attended. "area" (points mode): attended where any pixel of the cell is foreground;
    "nearest" (shift mode): nearest-neighbour resizing."""
    out = []
    for m in masks:
        if len(m) == 0:
            continue
        resized = F.interpolate(m[:, None].float(), size=tuple(size), mode=mode).flatten(1)
        out.append(resized <= 1e-8 if mode == "area" else resized < 0.5)
    return torch.cat(out)


def point_noise(masks: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """Flip each pixel of each mask (..., h*w) with probability ``noise_scale`` * (attended pixels of
    that mask) / (h*w), independently (the official "points" noise)."""
    hw = masks.shape[-1]
    ratio = (~masks).sum(-1) * noise_scale / hw
    flips = torch.rand_like(masks, dtype=torch.float) < ratio[..., None]
    return torch.logical_xor(masks, flips)


def label_noise(labels: torch.Tensor, ratio: float, num_classes: int) -> torch.Tensor:
    """Each label replaced, with probability ``ratio``, by a class drawn uniformly from
    [0, num_classes) (possibly itself); ``ratio`` <= 0: unchanged."""
    if ratio <= 0:
        return labels
    labels = labels.clone()
    chosen = torch.rand_like(labels, dtype=torch.float) < ratio
    labels[chosen] = torch.randint_like(labels[chosen], 0, num_classes)
    return labels


def mask_boxes(masks: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Masks (T, H, W) -> their bounding boxes (T, 4) as (cx, cy, w, h) / image size (Detectron2's
    BitMasks boxes: right and bottom edges one past the last pixel; empty masks give zeros)."""
    h, w = image_size
    boxes = masks.new_zeros((len(masks), 4), dtype=torch.float)
    rows, cols = masks.any(2), masks.any(1)
    for i in range(len(masks)):
        ys, xs = torch.where(rows[i])[0], torch.where(cols[i])[0]
        if len(ys) and len(xs):
            x0, x1, y0, y1 = float(xs[0]), float(xs[-1]) + 1, float(ys[0]), float(ys[-1]) + 1
            boxes[i] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
    return boxes


def shift_noise(masks: torch.Tensor, boxes: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """The official "shift" noise: masks (M, h, w) bool (True = not attended) translated, each by
    its own random offset, as the official code computes it: rows by u1 * noise_scale * box width / 2,
    columns by u2 * noise_scale * box height / 2 (boxes (M, 4) normalised (cx, cy, w, h)), both in
    units of the level's width w, u ~ U(-1, 1); pixels pushed out are clamped to the border."""
    h, w = masks.shape[-2:]
    half = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
    delta = (torch.rand_like(boxes) * 2 - 1.0) * half * noise_scale * w
    out = torch.ones_like(masks)
    for i in range(len(masks)):
        ys, xs = torch.where(~masks[i])
        ys = (ys + delta[i, 0]).clamp(min=0, max=h - 1).long()
        xs = (xs + delta[i, 1]).clamp(min=0, max=w - 1).long()
        out[i, ys, xs] = False
    return out


def level_masks_for_shift(targets: Sequence[Dict], sizes: Sequence[Tuple[int, int]], repeat: int,
                          noise_scale: float) -> List[torch.Tensor]:
    """Shift mode: the noised ground-truth masks (M, h_l*w_l) of every level, shifted once at the
    finest level (``sizes[-1]``) and resized from it (nearest) to the others."""
    finest = tuple(sizes[-1])
    masks = gt_attention_masks([t["masks"] for t in targets], finest, mode="nearest").repeat(repeat, 1)
    masks = masks.unflatten(1, finest)
    if noise_scale > 0:
        boxes = torch.cat([mask_boxes(t["masks"], t.get("image_size", t["masks"].shape[-2:]))
                           for t in targets if len(t["masks"])]).repeat(repeat, 1)
        masks = shift_noise(masks, boxes.to(masks.device), noise_scale)
    return [masks.flatten(1) if tuple(s) == finest else
            (F.interpolate(masks[:, None].float(), size=tuple(s), mode="nearest") > 0.5).flatten(1) for s in sizes]
