"""How accelerations attach (mask2former.accel.core): class swaps that keep the module, the
plain model running no acceleration code at all, eligibility, and the verified-once cache."""
import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch

import mask2former as m2f
from mask2former.accel import (
    VerifiedOnce,
    accelerates,
    fast_inference_enabled,
    plain_type,
    set_fast_inference,
    verified,
)
from mask2former.accel.position import CACHE_SIZE
from mask2former.layers import PositionEmbeddingSine
from mask2former.modeling.backbone.resnet import ResNet

REPO = Path(__file__).resolve().parents[1]
ACCEL_DIR = str(REPO / "mask2former" / "accel")


@pytest.fixture(scope="module")
def synthetic_model():
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "synthetic" / "panoptic.yaml"))
    torch.manual_seed(0)
    return m2f.build_model(cfg).eval()


def _image():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 128, 160), generator=g).float(), "height": 128, "width": 160}]


def _python_files_called(fn):
    """The source files of every Python function that runs during fn()."""
    files = set()

    def profile(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files


def test_plain_model_runs_no_acceleration_code(synthetic_model):
    model = synthetic_model
    inputs = _image()
    with torch.no_grad():
        assert model.fast_inference
        fast_files = _python_files_called(lambda: model(inputs))
        assert any(f.startswith(ACCEL_DIR) for f in fast_files)  # the probe sees accel code when it runs
        model.fast_inference = False
        plain_files = _python_files_called(lambda: model(inputs))
        model.fast_inference = True
    assert not [f for f in plain_files if f.startswith(ACCEL_DIR)]
    assert [f for f in plain_files if "mask2former" in f]


def test_swapping_keeps_the_module(synthetic_model):
    model = copy.deepcopy(synthetic_model)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.sem_seg_head.predictor.register_forward_hook(lambda *a: None)
    model.fast_inference = False
    assert not fast_inference_enabled(model)
    assert all(type(m).__module__.split(".")[1] != "accel" for m in model.modules())
    model.fast_inference = True
    assert type(model).__name__ == "FastMaskFormer" and plain_type(model) is m2f.modeling.MaskFormer
    assert isinstance(model, m2f.modeling.MaskFormer)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == state.keys()
    assert hook.id in model.sem_seg_head.predictor._forward_hooks
    hook.remove()
    # accelerated models copy and pickle; the copies stay accelerated
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert fast_inference_enabled(clone) and type(clone.backbone) is type(model.backbone)


def test_fast_and_plain_outputs_of_the_built_model(synthetic_model):
    model = synthetic_model
    with torch.no_grad():
        fast = [model(_image())[0] for _ in range(2)]
        model.fast_inference = False
        plain = model(_image())[0]
        model.fast_inference = True
    for out in fast:
        assert torch.equal(out["sem_seg"], plain["sem_seg"])
        assert torch.equal(out["panoptic_seg"][0], plain["panoptic_seg"][0])
        assert out["panoptic_seg"][1] == plain["panoptic_seg"][1]
        assert torch.equal(out["instances"].scores, plain["instances"].scores)


def test_eligibility_is_decided_when_swapping():
    from mask2former.accel.cpu.resnet import FastBottleneckBlock, FastResNet
    from mask2former.modeling.backbone.resnet import BasicStem, make_resnet_stages

    # trainable BatchNorm: the blocks fuse nothing but are swapped; the ResNet cannot run blocked
    model = ResNet(BasicStem(3, 64, norm="BN"), make_resnet_stages(50, norm="BN"), out_features=["res5"])
    set_fast_inference(model)
    assert type(model) is ResNet and type(model.res2[0]) is FastBottleneckBlock

    class MyResNet(ResNet):  # a user's subclass may rely on anything: left alone
        pass

    mine = MyResNet(BasicStem(3, 64, norm="FrozenBN"), make_resnet_stages(50, norm="FrozenBN"), out_features=["res5"])
    set_fast_inference(mine)
    assert type(mine) is MyResNet and FastResNet not in type(mine).__mro__


def test_accelerates_rejects_what_cannot_be_swapped():
    with pytest.raises(TypeError, match="derive"):
        @accelerates(ResNet)
        class NotASubclass(torch.nn.Module):
            pass
    with pytest.raises(TypeError, match="__init__"):
        @accelerates(PositionEmbeddingSine)
        class WithInit(PositionEmbeddingSine):
            def __init__(self):
                super().__init__()
    with pytest.raises(ValueError, match="already"):
        @accelerates(ResNet)
        class Second(ResNet):
            pass


def test_verified_once():
    cache = VerifiedOnce(maxsize=2)
    calls = []

    def run(key, fast_value, plain_value=1):
        return cache.run(key, lambda: calls.append("fast") or fast_value, lambda: calls.append("plain") or plain_value,
                         lambda a, b: a == b)

    assert run("a", 1) == 1 and calls == ["plain", "fast"]  # first: both, the plain result
    calls.clear()
    assert run("a", 1) == 1 and calls == ["fast"]
    calls.clear()
    assert run("b", 2) == 1 and calls == ["plain", "fast"]  # no match: the plain result
    calls.clear()
    assert run("b", 2) == 1 and calls == ["plain"]  # and the plain computation from then on
    assert cache.verdicts() == {"a": True, "b": False}
    run("a", 1)  # a becomes the most recently used
    run("c", 1)
    assert cache.verdicts() == {"a": True, "c": True} and len(cache) == 2  # b dropped
    cache.clear()
    assert len(cache) == 0


def test_verdicts_are_dropped_with_fast_inference(synthetic_model):
    model = copy.deepcopy(synthetic_model)
    with torch.no_grad():
        model(_image())
    decoder = model.sem_seg_head.predictor
    assert len(verified(decoder)) > 0
    model.fast_inference = False
    model.fast_inference = True
    assert len(verified(decoder)) == 0


def test_position_encoding_cache():
    pe = PositionEmbeddingSine(16, normalize=True).eval()
    x = torch.zeros(2, 8, 5, 7)
    want = pe(x)
    set_fast_inference(pe)
    with torch.no_grad():
        first, second = pe(x), pe(x)
        assert torch.equal(first, want) and first.data_ptr() == second.data_ptr()  # computed once
        for h in range(1, CACHE_SIZE + 2):
            pe(torch.zeros(1, 8, h, 3))
        assert pe(x).data_ptr() != first.data_ptr()  # the oldest size was dropped
        mask = torch.rand(2, 5, 7) < 0.3
        assert torch.equal(pe(x, mask), PositionEmbeddingSine._encode(pe, mask))
    assert pe(x).data_ptr() != pe(x).data_ptr()  # with autograd: the plain computation
