"""SeMask through the Detectron2 integration (skipped without Detectron2, like
tests/test_detectron2.py, whose helpers it uses): Detectron2's ``build_model`` builds the released
SeMask models with their state-dict keys, and the Detectron2-built tiny SeMask model trains with
the losses of this package's, ``loss_cate`` included, from samples in Detectron2's structures.
Its parity with the official outputs is in tests/test_detectron2.py (``semask_semantic``)."""
import torch

from tests.test_detectron2 import REPO, _build_both, _d2_cfg, d2  # noqa: F401 (d2: a fixture)


def test_detectron2_built_semask_models_have_the_released_keys(d2, parity_dir):
    from detectron2.modeling import build_model

    from tests.test_semask_model import semask_manifests

    for spec in semask_manifests(parity_dir):
        cfg = _d2_cfg(REPO / spec["config"])
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            model = build_model(cfg)
        assert type(model.backbone).__name__ == "D2SeMaskSwinTransformer"
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: list(v) for k, v in spec["keys"].items()}


def _semask_training_batch():
    """Two samples as Detectron2's loaders give them (Instances with BitMasks) with their sem_seg."""
    from detectron2.structures import BitMasks, Instances

    batch = []
    for seed, (h, w) in enumerate([(64, 64), (48, 64)]):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (h, w), generator=g) * 7
        labels[:4] = 255
        classes = labels[labels != 255].unique()
        masks = BitMasks(labels[None] == classes[:, None, None])
        batch.append({"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "sem_seg": labels,
                      "instances": Instances((h, w), gt_classes=classes, gt_masks=masks)})
    return batch


def test_detectron2_built_semask_model_trains_like_ours(d2, parity_dir):
    from detectron2.layers import ShapeSpec

    from mask2former.detectron2 import registration

    _, model, ours = _build_both(parity_dir, "semask_semantic")
    assert isinstance(model, registration.SeMaskMaskFormer) and model.fast_inference
    assert isinstance(model.backbone, registration.D2SeMaskSwinTransformer)
    assert all(isinstance(v, ShapeSpec) for v in model.backbone.output_shape().values())
    assert {k: (v.channels, v.stride) for k, v in model.backbone.output_shape().items()} == \
        {k: (v.channels, v.stride) for k, v in ours.backbone.output_shape().items()}
    losses = []
    for m in (model, ours):
        m.train()
        torch.manual_seed(0)  # the criterion's random points and the semantic layers' dropout
        losses.append(m(_semask_training_batch()))
    assert "loss_cate" in losses[0] and losses[0].keys() == losses[1].keys()
    assert [k for k in losses[0] if not torch.equal(losses[0][k], losses[1][k])] == []
    q = model.backbone.layers[3].semantic_layer.class_injection[0].mlp_cls_q.weight
    assert torch.autograd.grad(losses[0]["loss_cate"], q)[0].abs().sum() > 0
