"""kMaX-DeepLab inference: parity with the official model (../shared/parity/kmax), the released
checkpoints' keys, the input convention and what happens off it, fast inference.

Tolerances are the kMaX section's of ../shared/parity/README.md: probabilities within 1e-3,
argmax maps and masks agreeing on >= 99.9 % of pixels, scores within 5e-4, the same classes,
panoptic segments equal up to renumbering, instances compared as sets (near-equal scores may
swap places), ``original_image`` within 1 grey level.
"""
import json

import numpy as np
import pytest
import torch

import mask2former as m2f
from mask2former.modeling.meta_arch.kmax_deeplab import output_crop
from tests.test_manifests import check_manifest
from tests.test_parity import canonical_panoptic

PROB_TOL = 1e-3
SCORE_TOL = 5e-4
PIXEL_AGREEMENT = 0.999
MANIFESTS = ("coco_panoptic_R50", "coco_panoptic_convnextL")


@pytest.fixture(scope="module")
def kmax_dir(parity_dir):
    return parity_dir / "kmax"


@pytest.fixture(scope="module")
def tiny(kmax_dir):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(kmax_dir / "tiny_kmax_panoptic.yaml"))
    model = m2f.build_model(cfg).eval()
    result = m2f.load_checkpoint(model, str(kmax_dir / "tiny_kmax_panoptic.pkl"))
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def io(kmax_dir):
    return np.load(kmax_dir / "tiny_kmax_panoptic_io.npz")


def run(model, image_hwc, out_hw):
    inp = {"image": torch.as_tensor(np.ascontiguousarray(image_hwc.transpose(2, 0, 1))).float(),
           "height": int(out_hw[0]), "width": int(out_hw[1])}
    with torch.no_grad():
        return model([inp])[0]


def check_instances_as_sets(ins, classes, scores, masks):
    """Same multiset of classes, scores equal once sorted, and every official instance matched by
    one of ours of its class and score whose mask agrees on >= 99.9 % of the pixels."""
    assert sorted(ins.pred_classes.tolist()) == sorted(classes.tolist())
    ours_scores = ins.scores.numpy()
    np.testing.assert_allclose(np.sort(ours_scores), np.sort(scores), atol=SCORE_TOL, rtol=0)
    ours_masks = ins.pred_masks.numpy().astype(np.uint8)
    assert ours_masks.shape == masks.shape
    free = set(range(len(ours_scores)))
    for i in np.argsort(-scores, kind="stable"):
        candidates = [j for j in free if ins.pred_classes[j] == classes[i] and abs(ours_scores[j] - scores[i]) <= SCORE_TOL]
        agreement = {j: (ours_masks[j] == masks[i]).mean() for j in candidates}
        best = max(agreement, key=agreement.get, default=None)
        assert best is not None and agreement[best] >= PIXEL_AGREEMENT, (
            f"official instance {i} (class {int(classes[i])}, score {scores[i]:.6f}) has no match among ours")
        free.remove(best)


def partition_agreement(ours, ref):
    """Share of pixels whose segment is the same once our ids are renamed to the official ones
    (each official segment paired with the one of ours it overlaps most; pairs one-to-one)."""
    pairs, counts = np.unique(np.stack([ref.ravel(), ours.ravel()]), axis=1, return_counts=True)
    rename = {}
    for (r, o), _ in sorted(zip(pairs.T.tolist(), counts.tolist()), key=lambda pc: -pc[1]):
        if r not in rename and o not in rename.values():
            rename[r] = o
    assert len(rename) == len(np.unique(ref)) == len(np.unique(ours)), "segments without a counterpart"
    lut = np.zeros(int(ref.max()) + 1, dtype=ours.dtype)
    lut[list(rename)] = list(rename.values())
    return float((lut[ref] == ours).mean())


def compare(out, g):
    """Checks one output against the official one (``g``: key -> array); returns the max prob diff."""
    oh, ow = (int(v) for v in g("out_hw"))
    sem = out["sem_seg"]
    assert tuple(sem.shape) == (133, oh, ow)
    yx = g("sem_yx")
    diff = max(np.abs(sem.mean((1, 2)).numpy() - g("sem_mean")).max(),
               np.abs(sem[:, yx[0], yx[1]].numpy() - g("sem_samples")).max())
    assert diff <= PROB_TOL
    assert (sem.argmax(0).numpy() == g("sem_argmax")).mean() >= PIXEL_AGREEMENT
    seg, info = out["panoptic_seg"]
    cats, segs = canonical_panoptic(seg.numpy(), info)
    ref_cats, ref_segs = canonical_panoptic(g("panoptic_seg"), json.loads(str(g("panoptic_info"))))
    assert segs == ref_segs
    assert (cats == ref_cats).mean() >= PIXEL_AGREEMENT
    assert partition_agreement(seg.numpy(), g("panoptic_seg")) >= PIXEL_AGREEMENT
    check_instances_as_sets(out["instances"], g("ins_classes"), g("ins_scores"), g("ins_masks"))
    image = out["original_image"]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, oh, ow)
    assert np.abs(image.numpy().astype(int) - g("original_image").astype(int)).max() <= 1
    return diff


@pytest.mark.slow
def test_matches_official_outputs(tiny, io):
    cases = sorted({k.split("__")[0] for k in io.files})
    assert len(cases) == 6
    for case in cases:
        g = lambda key: io[f"{case}__{key}"]  # noqa: E731
        compare(run(tiny, g("image"), g("out_hw")), g)


def test_one_wrong_instance_mask_fails(io):
    from mask2former.structures import Instances

    g = lambda key: io[f"random_native__{key}"]  # noqa: E731
    classes, scores, masks = g("ins_classes"), g("ins_scores"), g("ins_masks")
    def as_output(m, order=slice(None)):
        return Instances(m.shape[1:], pred_classes=torch.as_tensor(classes[order]),
                         scores=torch.as_tensor(scores[order]), pred_masks=torch.as_tensor(m[order]))

    order = np.random.default_rng(0).permutation(len(scores))
    check_instances_as_sets(as_output(masks, order), classes, scores, masks)  # any order: compared as sets
    i = int(np.argmax(masks.reshape(len(masks), -1).sum(1)))
    wrong = masks.copy()
    wrong[i] = 1 - masks[i]
    with pytest.raises(AssertionError, match="has no match"):
        check_instances_as_sets(as_output(wrong), classes, scores, masks)


def test_every_kmax_parity_file_is_known(kmax_dir):
    assert sorted(p.name for p in kmax_dir.glob("tiny_*_io.npz")) == ["tiny_kmax_panoptic_io.npz"]
    assert sorted(p.stem[len("manifest_kmax_"):] for p in kmax_dir.glob("manifest_kmax_*.json")) == sorted(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_released_checkpoint_keys(kmax_dir, name):
    check_manifest(json.loads((kmax_dir / f"manifest_kmax_{name}.json").read_text()))


@pytest.mark.parametrize("image_hw, out_hw, crop", [
    ((65, 97), (213, 320), (65, 97)),    # the convention: the official crop
    ((65, 97), (319, 480), (64, 97)),    # its rounding, a row short of the image
    ((66, 97), (213, 320), (65, 97)),
    ((50, 50), (50, 50), (50, 50)),      # long side short of IMAGE_SIZE: the image, not (97, 97)
    ((97, 97), (100, 200), (97, 97)),    # another aspect ratio asked for: the image, not (48, 97)
])
def test_output_crop(image_hw, out_hw, crop):
    assert output_crop(image_hw, (97, 97), out_hw) == crop


@pytest.mark.slow
def test_smaller_input_is_cropped_to_itself(tiny, io):
    """An input whose long side is short of IMAGE_SIZE: the official code would crop a 97 x 97
    area (mostly padding) and stretch it; ours predicts on the image's own area."""
    from torch.nn import functional as F

    image = io["rocket_native__image"][:40, :60]
    out = run(tiny, image, (40, 60))
    inp = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    assert torch.equal(out["original_image"], inp.to(torch.uint8))
    # the semantic map is that of the image's own 40 x 60 area of the padded prediction
    with torch.no_grad():
        padded = F.pad((inp - 127.5) / 127.5, (0, 97 - 60, 0, 97 - 40))[None]
        head = tiny.predict_padded(padded)
        masks = F.interpolate(head["pred_masks"], size=(97, 97), mode="bilinear", align_corners=True)[0, :, :40, :60]
        expected = torch.einsum("qc,qhw->chw", head["pred_logits"][0].softmax(-1)[:, :-1], masks.softmax(0))
    assert (out["sem_seg"] - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_larger_input_is_resized_to_fit(tiny, io):
    """An input larger than IMAGE_SIZE (the official model cannot run it) is resized to fit and
    then follows the convention: the result is that of the resized input (bilinear, antialiased)."""
    from torch.nn import functional as F

    big = torch.as_tensor(np.ascontiguousarray(io["rocket_native__source_image"].transpose(2, 0, 1))).float()
    assert big.shape[-1] > 97
    out_hw = tuple(big.shape[-2:])
    with torch.no_grad():
        out = tiny([{"image": big, "height": out_hw[0], "width": out_hw[1]}])[0]
        fitted = F.interpolate(big[None], size=(65, 97), mode="bilinear", align_corners=False, antialias=True)[0]
        ref = tiny([{"image": fitted, "height": out_hw[0], "width": out_hw[1]}])[0]
    assert torch.equal(out["sem_seg"], ref["sem_seg"]) and torch.equal(out["original_image"], ref["original_image"])
    assert torch.equal(out["panoptic_seg"][0], ref["panoptic_seg"][0])


def test_input_errors_are_clear(tiny):
    with pytest.raises(ValueError, match=r"must have shape \(3, H, W\)"):
        tiny([{"image": torch.zeros(97, 97, 3)}])
    tiny.train()
    try:
        # training is implemented now (tests/test_kmax_training.py): a sample without targets is refused
        with pytest.raises(ValueError, match="training mode.*no 'instances'"):
            tiny([{"image": torch.zeros(3, 97, 97)}])
    finally:
        tiny.eval()


def test_default_output_size_is_the_input_size(tiny):
    with torch.no_grad():
        out = tiny([{"image": torch.full((3, 60, 97), 128.0)}])[0]
    assert tuple(out["sem_seg"].shape[1:]) == (60, 97) and tuple(out["original_image"].shape) == (3, 60, 97)


def test_fast_inference_changes_nothing(tiny, io):
    assert tiny.fast_inference  # build_model applied it (the ResNet blocks)
    inputs = [{"image": torch.as_tensor(np.ascontiguousarray(io[f"{c}__image"].transpose(2, 0, 1))).float(),
               "height": 90, "width": 120} for c in ("rocket_up", "random_up")]
    with torch.no_grad():
        fast = tiny(inputs)
        tiny.fast_inference = False
        try:
            plain = tiny(inputs)
        finally:
            tiny.fast_inference = True
    for a, b in zip(fast, plain):
        assert torch.equal(a["sem_seg"], b["sem_seg"]) and torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_a_batch_equals_single_images(tiny, io):
    """Every input is padded to IMAGE_SIZE, so images of different sizes batch together."""
    inputs = [{"image": torch.as_tensor(np.ascontiguousarray(io[f"{c}__image"].transpose(2, 0, 1))).float()}
              for c in ("rocket_native", "immunohistochemistry_native")]
    with torch.no_grad():
        batch = tiny(inputs)
        single = [tiny([x])[0] for x in inputs]
    for a, b in zip(batch, single):
        assert (a["sem_seg"] - b["sem_seg"]).abs().max() <= PROB_TOL  # float rounding of batched convs
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]


def test_no_test_time_augmentation(tiny):
    with pytest.raises(NotImplementedError, match="TEST.AUG"):
        tiny.resize_and_semantic(None, None, (97, 97), 97, 97)
