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

MODELS = ["panoptic", "instance", "semantic", "swin_semantic", "maskformer_semantic", "mpformer_instance",
          "semask_semantic"]
# the descendants' parity files sit in their own folders of ../shared/parity
FOLDERS = {"mpformer_instance": "mpformer", "semask_semantic": "semask"}
PROB_TOL = 1e-4
PIXEL_AGREEMENT = 0.999


def parity_file(parity_dir, name, suffix):
    """../shared/parity[/<folder>]/tiny_<name><suffix>."""
    return parity_dir / FOLDERS.get(name, "") / f"tiny_{name}{suffix}"


def build_parity_model(parity_dir, name):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_file(parity_dir, name, ".yaml")))
    model = m2f.build_model(cfg).eval()
    result = m2f.load_checkpoint(model, str(parity_file(parity_dir, name, ".pkl")))
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


def check_instances(ins, classes, scores, masks):
    """Our Instances against the official ones, in the official order: count, classes, scores,
    and the masks pooled and instance by instance."""
    assert len(ins) == len(scores)
    assert ins.pred_classes.tolist() == classes.tolist()
    np.testing.assert_allclose(ins.scores.numpy(), scores, atol=PROB_TOL, rtol=0)
    ours = ins.pred_masks.numpy().astype(np.uint8)
    assert ours.shape == masks.shape
    assert (ours == masks).mean() >= PIXEL_AGREEMENT
    # README's mask tolerance (>= 99.9 % of the pixels) applied to each instance's mask on its
    # own. Pooled over the N = 100 instances it would let one mask disagree on 10 % of the image,
    # while these masks are 97.7-100 % foreground: a whole instance could be wrong unnoticed.
    # Per instance it catches a wrong mask where the background is larger than 0.1 % of the
    # image (the immunohistochemistry and random inputs); the rocket masks (0-0.9 % background)
    # are constrained less.
    agreement = (ours == masks).reshape(len(masks), -1).mean(1)
    for worst in agreement.argsort()[:1]:
        assert agreement[worst] >= PIXEL_AGREEMENT, (
            f"instance {worst} (class {int(classes[worst])}): its mask agrees with the official one on "
            f"{agreement[worst]:.4%} of the pixels; expected >= {PIXEL_AGREEMENT:.1%}")


def check_official_outputs(out, io, case) -> set:
    """One output dict ``out`` of the parity input ``case`` against the official outputs stored in
    ``io``, with the README's tolerances; returns the tasks checked."""
    g = lambda key: io[f"{case}__{key}"]  # noqa: E731
    keys = {k.split("__")[1] for k in io.files if k.startswith(case + "__")}
    oh, ow = (int(v) for v in g("out_hw"))
    checked = set()
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
        check_instances(out["instances"], g("ins_classes"), g("ins_scores"), g("ins_masks"))
        checked.add("instance")
    return checked


@pytest.mark.parametrize("name", MODELS)
def test_matches_official_outputs(parity_dir, name):
    model = build_parity_model(parity_dir, name)
    io = np.load(parity_file(parity_dir, name, "_io.npz"))
    cases = parity_cases(io)
    assert cases, "no inputs in the parity file"
    checked = set()
    for case in cases:
        checked |= check_official_outputs(run(model, io[f"{case}__image"], io[f"{case}__out_hw"]), io, case)
    assert checked, f"no outputs checked for {name}"


def test_every_parity_model_is_tested(parity_dir):
    folders = ["", *sorted(set(FOLDERS.values()))]
    present = sorted(p.name[len("tiny_"):-len("_io.npz")] for f in folders for p in (parity_dir / f).glob("tiny_*_io.npz"))
    assert present == sorted(MODELS)


@pytest.mark.parametrize("corrupt", ["mirrored", "filled"])
def test_one_wrong_instance_mask_fails(parity_dir, corrupt):
    from mask2former.structures import Instances

    io = np.load(parity_dir / "tiny_instance_io.npz")
    case = "immunohistochemistry_native"
    classes, scores, masks = (io[f"{case}__{k}"] for k in ("ins_classes", "ins_scores", "ins_masks"))

    def as_output(m):
        return Instances(m.shape[1:], pred_classes=torch.as_tensor(classes), scores=torch.as_tensor(scores),
                         pred_masks=torch.as_tensor(m.astype(bool)))

    check_instances(as_output(masks), classes, scores, masks)
    wrong = masks.copy()
    wrong[7] = masks[7][:, ::-1] if corrupt == "mirrored" else 1
    assert (wrong != masks).any()
    assert (wrong == masks).mean() >= PIXEL_AGREEMENT  # the pooled comparison alone lets it through
    with pytest.raises(AssertionError, match="instance 7 "):
        check_instances(as_output(wrong), classes, scores, masks)
