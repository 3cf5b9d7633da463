"""Outputs equal the official implementation's on the tiny parity models (../shared/parity).

Tolerances are those of ../shared/parity/README.md: probabilities and scores within 1e-4,
argmax maps and binary masks agreeing on >= 99.9 % of pixels, identical classes, panoptic
segments equal up to renumbering.
"""
import json

import numpy as np
import pytest
import torch

import mask2former as m2f

MODELS = ["panoptic", "instance", "semantic", "swin_semantic", "maskformer_semantic"]
PROB_TOL = 1e-4
PIXEL_AGREEMENT = 0.999


def build_parity_model(parity_dir, name):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / f"tiny_{name}.yaml"))
    model = m2f.build_model(cfg).eval()
    result = m2f.load_checkpoint(model, str(parity_dir / f"tiny_{name}.pkl"))
    assert not result.missing_keys and not result.unexpected_keys
    return model


def parity_cases(io):
    return sorted({k.split("__")[0] for k in io.files})


def run(model, image_hwc, out_hw):
    inp = {"image": torch.as_tensor(image_hwc.transpose(2, 0, 1)).float(),
           "height": int(out_hw[0]), "width": int(out_hw[1])}
    with torch.no_grad():
        return model([inp])[0]


def canonical_panoptic(seg, info):
    """Map segment ids to (category_id, isthing) so that renumbering does not matter."""
    seg = np.asarray(seg)
    lut = {0: (-1, False)}
    lut.update({s["id"]: (s["category_id"], bool(s["isthing"])) for s in info})
    cats = np.vectorize(lambda i: lut[int(i)][0])(seg)
    return cats, sorted((s["category_id"], bool(s["isthing"])) for s in info)


def same_partition(a, b):
    """True when two id maps describe the same regions (ids may differ)."""
    pairs = set(zip(np.asarray(a).ravel().tolist(), np.asarray(b).ravel().tolist()))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


@pytest.mark.parametrize("name", MODELS)
def test_matches_official_outputs(parity_dir, name):
    model = build_parity_model(parity_dir, name)
    io = np.load(parity_dir / f"tiny_{name}_io.npz")
    cases = parity_cases(io)
    assert cases, "no inputs in the parity file"
    checked = set()
    for case in cases:
        g = lambda key: io[f"{case}__{key}"]  # noqa: E731
        keys = {k.split("__")[1] for k in io.files if k.startswith(case + "__")}
        out = run(model, g("image"), g("out_hw"))
        oh, ow = (int(v) for v in g("out_hw"))
        if "sem_mean" in keys:
            sem = out["sem_seg"]
            assert tuple(sem.shape[1:]) == (oh, ow)
            np.testing.assert_allclose(sem.mean((1, 2)).numpy(), g("sem_mean"), atol=PROB_TOL, rtol=0)
            yx = g("sem_yx")
            np.testing.assert_allclose(sem[:, yx[0], yx[1]].numpy(), g("sem_samples"), atol=PROB_TOL, rtol=0)
            assert (sem.argmax(0).numpy() == g("sem_argmax")).mean() >= PIXEL_AGREEMENT
            checked.add("semantic")
        if "panoptic_seg" in keys:
            seg, info = out["panoptic_seg"]
            ref_seg, ref_info = g("panoptic_seg"), json.loads(str(g("panoptic_info")))
            cats, segs = canonical_panoptic(seg.numpy(), info)
            ref_cats, ref_segs = canonical_panoptic(ref_seg, ref_info)
            assert segs == ref_segs
            assert (cats == ref_cats).mean() >= PIXEL_AGREEMENT
            assert same_partition(seg.numpy(), ref_seg)
            checked.add("panoptic")
        if "ins_scores" in keys:
            ins = out["instances"]
            assert len(ins) == len(g("ins_scores"))
            assert ins.pred_classes.tolist() == g("ins_classes").tolist()
            np.testing.assert_allclose(ins.scores.numpy(), g("ins_scores"), atol=PROB_TOL, rtol=0)
            masks = ins.pred_masks.numpy().astype(np.uint8)
            assert masks.shape == g("ins_masks").shape
            assert (masks == g("ins_masks")).mean() >= PIXEL_AGREEMENT
            checked.add("instance")
    assert checked, f"no outputs checked for {name}"


def test_every_parity_model_is_tested(parity_dir):
    present = sorted(p.name[len("tiny_"):-len("_io.npz")] for p in parity_dir.glob("tiny_*_io.npz"))
    assert present == sorted(MODELS)
