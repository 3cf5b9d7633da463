"""Channel-blocked (oneDNN opaque) activations in the ResNet's fast inference path: the layout
probe, the dense view of opaque memory, and the ResNet's once-per-size check against NCHW."""
import pytest
import torch

from mask2former.accel import set_fast_inference, verified
from mask2former.accel.cpu import blocked
from mask2former.accel.cpu import resnet as accel_resnet
from mask2former.ops import frozen_bn_act_compiled
from tests.test_frozen_bn_act import resnet
from tests.conftest import require_compiled_cpu_ops


@pytest.fixture
def block():
    b = blocked.block_size()
    if b is None:
        pytest.skip("torch has no oneDNN opaque tensors with readable memory here")
    require_compiled_cpu_ops()
    if not frozen_bn_act_compiled():
        pytest.skip("the compiled frozen_bn_act kernel does not reproduce this torch's batch_norm bitwise "
                    "here (its self-check failed): no channel-blocked path")
    return b


@pytest.fixture
def threads():
    """At least two torch threads (the blocked path is never tried with one), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def test_blocked_view_is_the_conv_output_in_blocks(block):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 3, 64, 80, generator=g), torch.randn(2 * block, 3, 7, 7, generator=g)
    with torch.no_grad():
        out = torch.mkldnn_convolution(x.to_mkldnn(), w, None, [3, 3], [2, 2], [1, 1], 1)
        view = blocked.blocked_view(out)
        assert view.shape == (1, 2, 32, 40, block)
        nchw = out.to_dense()
        assert torch.equal(view.permute(0, 1, 4, 2, 3).reshape(nchw.shape), nchw)
        view.zero_()  # the view aliases the opaque tensor's memory
        assert not out.to_dense().any()
    with pytest.raises(ValueError, match="channels"):
        blocked.blocked_view(torch.zeros(1, block + 1, 4, 4).to_mkldnn())


@pytest.mark.parametrize("shape", [(1, 3, 256, 320), (2, 3, 160, 224)])
def test_resnet_blocked_path_matches_nchw(block, threads, shape):
    """First call: NCHW result, and the blocked path checked against it; later calls at a size
    that matched run blocked, with the same bits as the plain path."""
    model = resnet(50)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    set_fast_inference(model, False)
    with torch.no_grad():
        plain = model(x)
        set_fast_inference(model, True)
        outs = [model(x), model(x)]
    assert list(verified(model).verdicts()) == [("blocked", shape)]
    for out in outs:
        assert out.keys() == plain.keys()
        for k in plain:
            assert torch.equal(out[k], plain[k]) and out[k].layout == torch.strided and out[k].is_contiguous(), k


def test_resnet_blocked_path_rejected_when_it_differs(block, threads, monkeypatch):
    """A blocked path that does not reproduce the NCHW outputs is never used for that size."""
    model = resnet(50)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        set_fast_inference(model, False)
        plain = model(x)
        set_fast_inference(model, True)
        real = blocked.blocked_view
        monkeypatch.setattr(accel_resnet, "blocked_view", lambda t: real(t).flip(-1))
        outs = [model(x), model(x)]
    assert verified(model).verdicts() == {("blocked", tuple(x.shape)): False}
    for out in outs:
        for k in plain:
            assert torch.equal(out[k], plain[k]), k


def test_resnet_blocked_path_only_when_allowed(block, threads):
    model = resnet(50)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model.blocked_allowed(x)
        assert not model.blocked_allowed(x.double())
        assert not model.blocked_allowed(x.contiguous(memory_format=torch.channels_last))
        set_fast_inference(model, False)
        assert not isinstance(model, accel_resnet.FastResNet)
        set_fast_inference(model, True)
        model.train()
        assert not model.blocked_allowed(x)
        model.eval()
        handle = model.res3[0].conv2.register_forward_hook(lambda *a: None)
        assert not model.blocked_allowed(x)
        handle.remove()
        set_fast_inference(model.res3[1], False)  # a plain block among fast ones
        assert not model.blocked_allowed(x)
        set_fast_inference(model.res3[1], True)
        assert model.blocked_allowed(x)
    assert not model.blocked_allowed(x)  # grad mode on
    with torch.no_grad():
        torch.set_num_threads(1)  # torch's own 1x1 kernel then differs from oneDNN's
        assert not model.blocked_allowed(x)
