"""Test-time augmentation against expectations written out here, for the three tasks.

The test builds each view itself (ResizeShortestEdge's size rule re-derived below, PIL bilinear
resizes as Detectron2 does for uint8 images, horizontal flips), runs the plain model on every
view, takes that view's outputs (the semantic probabilities the model returns, and the per-query
class logits and mask logits its head computes, captured with a forward hook), brings them to the
output size and un-flips them here, and averages them. :class:`MaskFormerWithTTA` must give:

* ``sem_seg``: the mean of the per-view class probabilities, as the official
  ``SemanticSegmentorWithTTA`` computes it;
* ``panoptic_seg`` / ``instances``: the model's usual post-processing of the per-query class
  logits and mask logits averaged over the views (the README's "Run the demo" section).

The tiny parity models (../shared/parity) give non-trivial predictions with real weights.
"""
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

import mask2former as m2f
from mask2former.modeling.test_time_augmentation import MaskFormerWithTTA

# Float tolerance between the TTA path and the per-view runs here: the same computation, except
# that TTA batches a view with its mirror image; README.md of ../shared/parity suggests 1e-4 for
# probabilities and scores, and >= 99.9 % pixel agreement for maps and masks.
TOL = 1e-4
PIXEL_AGREEMENT = 0.999
HEIGHT, WIDTH = 80, 80  # the original image size the outputs are asked at
MIN_SIZES, MAX_SIZE = (40, 120), 100
# 40 -> 40x40; 120 -> 120x120, over MAX_SIZE, so the long side is capped: 100x100
EXPECTED_SIZES = [(40, 40), (100, 100)]


def shortest_edge_size(h, w, short, max_size):
    """ResizeShortestEdge: short side to ``short``, then long side capped at ``max_size``,
    each side rounded half up."""
    scale = short / min(h, w)
    nh, nw = h * scale, w * scale
    if max(nh, nw) > max_size:
        nh, nw = nh * max_size / max(nh, nw), nw * max_size / max(nh, nw)
    return int(nh + 0.5), int(nw + 0.5)


def pil_resize(hwc, h, w):
    return np.asarray(Image.fromarray(hwc).resize((w, h), Image.BILINEAR))


def to_output_size(mask_pred, view_hw, size_divisibility):
    """Head mask logits (Q, h/4, w/4) of one view -> (Q, HEIGHT, WIDTH): upsampled to the padded
    input, the padding cut off, then resized to the output size (both bilinear)."""
    d = max(size_divisibility, 1)
    padded = tuple(-(-s // d) * d for s in view_hw)
    m = F.interpolate(mask_pred[None], size=padded, mode="bilinear", align_corners=False)[0]
    m = m[:, : view_hw[0], : view_hw[1]]
    return F.interpolate(m[None], size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]


@lru_cache(maxsize=None)
def parity_model(parity_dir, name):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / f"tiny_{name}.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    model = m2f.build_model(cfg).eval()
    m2f.load_checkpoint(model, str(parity_dir / f"tiny_{name}.pkl"))
    return cfg, model


def run_view(model, view_hwc):
    """The plain model on one view, outputs asked at (HEIGHT, WIDTH); returns its outputs and
    the head's class logits (Q, K+1) and mask logits (Q, h/4, w/4)."""
    captured = []
    handle = model.sem_seg_head.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        with torch.no_grad():
            image = torch.as_tensor(np.ascontiguousarray(view_hwc.transpose(2, 0, 1))).float()
            out = model([{"image": image, "height": HEIGHT, "width": WIDTH}])[0]
    finally:
        handle.remove()
    (head,) = captured
    return out, head["pred_logits"][0], head["pred_masks"][0]


def expected_averages(cfg, model, given_hwc):
    """The per-view outputs, un-flipped at (HEIGHT, WIDTH), averaged: sem_seg probabilities,
    class logits, mask logits (None where the model does not produce them)."""
    # the loader gives the image at the test size; the views start from it brought back to
    # (HEIGHT, WIDTH), as Detectron2's DatasetMapperTTA does
    base = pil_resize(given_hwc, HEIGHT, WIDTH)
    sizes = [shortest_edge_size(HEIGHT, WIDTH, s, MAX_SIZE) for s in MIN_SIZES]
    assert sizes == EXPECTED_SIZES
    sems, classes, masks = [], [], []
    for h, w in sizes:
        view = pil_resize(base, h, w)
        for flipped in (False, True):
            out, cls, mask = run_view(model, view[:, ::-1] if flipped else view)
            mask = to_output_size(mask, (h, w), cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY)
            if "sem_seg" in out:
                sems.append(out["sem_seg"].flip(-1) if flipped else out["sem_seg"])
            classes.append(cls)
            masks.append(mask.flip(-1) if flipped else mask)
    mean = lambda ts: torch.stack(ts).mean(0) if ts else None  # noqa: E731
    return mean(sems), mean(classes), mean(masks)


@pytest.mark.parametrize("name", ["panoptic", "instance", "semantic"])
def test_tta_is_the_average_of_the_views(parity_dir, name):
    cfg, model = parity_model(parity_dir, name)
    source = np.load(parity_dir / f"tiny_{name}_io.npz")["immunohistochemistry_native__image"]
    original = pil_resize(source, HEIGHT, WIDTH)
    given = pil_resize(original, 60, 60)  # what a test loader would hand over
    sem, cls, masks = expected_averages(cfg, model, given)

    tta = MaskFormerWithTTA(model, min_sizes=MIN_SIZES, max_size=MAX_SIZE, flip=True)
    seen = []
    plain_segments = model.segments_inference

    def spy(mask_cls, mask_pred):
        seen.append((mask_cls, mask_pred))
        return plain_segments(mask_cls, mask_pred)

    model.segments_inference = spy
    try:
        image = torch.as_tensor(np.ascontiguousarray(given.transpose(2, 0, 1)))
        got = tta([{"image": image, "height": HEIGHT, "width": WIDTH}])[0]
    finally:
        del model.segments_inference

    tasks = cfg.MODEL.MASK_FORMER.TEST
    assert ("sem_seg" in got) == tasks.SEMANTIC_ON
    if tasks.SEMANTIC_ON:
        assert got["sem_seg"].shape == sem.shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, HEIGHT, WIDTH)
        torch.testing.assert_close(got["sem_seg"], sem, atol=TOL, rtol=0)
    if not (tasks.PANOPTIC_ON or tasks.INSTANCE_ON):
        assert not seen
        return
    # the post-processing saw the averaged logits ...
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], cls, atol=TOL, rtol=0)
    assert seen[0][1].shape == masks.shape
    torch.testing.assert_close(seen[0][1], masks, atol=TOL, rtol=TOL)
    # ... and its results are those of the averages computed here
    want = plain_segments(cls, masks)
    assert ("panoptic_seg" in got) == tasks.PANOPTIC_ON and ("instances" in got) == tasks.INSTANCE_ON
    if tasks.PANOPTIC_ON:
        (seg, info), (want_seg, want_info) = got["panoptic_seg"], want["panoptic_seg"]
        assert {s["isthing"] for s in want_info} == {True, False}  # things and stuff to compare
        assert info == want_info
        assert (seg == want_seg).double().mean() >= PIXEL_AGREEMENT
    if tasks.INSTANCE_ON:
        ins, want_ins = got["instances"], want["instances"]
        assert len(want_ins) > 0 and ins.pred_classes.tolist() == want_ins.pred_classes.tolist()
        torch.testing.assert_close(ins.scores, want_ins.scores, atol=TOL, rtol=0)
        agreement = (ins.pred_masks == want_ins.pred_masks).double().mean((1, 2))
        assert agreement.min() >= PIXEL_AGREEMENT
