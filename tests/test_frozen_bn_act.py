"""FrozenBatchNorm2d (+ residual) (+ ReLU) fused for inference (mask2former.ops.frozen_bn_act):
the compiled CPU kernel is bitwise equal to the plain sequence F.batch_norm, +=, relu_ in every
instruction-set variant; the self-check gates it; and the ResNet fast path gives the plain
path's outputs bit for bit.
"""
import pytest
import torch
from torch.nn import functional as F

from mask2former.accel import fast_inference_enabled, set_fast_inference, verified
from mask2former.accel.cpu import resnet as accel_resnet
from mask2former.layers import Conv2d, FrozenBatchNorm2d
from mask2former.modeling.backbone.resnet import BasicStem, DeepLabStem, ResNet, make_resnet_stages
from mask2former.ops import frozen_bn, frozen_bn_act, frozen_bn_act_compiled
from mask2former.ops.backend import state
from tests.conftest import require_compiled_cpu_ops

SHAPES = [(2, 19, 5, 37), (1, 24, 1, 1), (2, 7, 16, 16), (1, 33, 9, 17), (2, 3, 1, 31), (1, 16, 4, 4)]


@pytest.fixture(scope="module")
def op():
    require_compiled_cpu_ops()
    return torch.ops.mask2former.frozen_bn_act


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN == NaN and -0.0 != 0.0."""
    return t.contiguous().view({4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    mismatches = int((bits(a) != bits(b)).sum())
    assert mismatches == 0, f"{mismatches} of {a.numel()} elements differ"


def make_case(shape, seed=0, specials=False):
    """x and residual of ``shape`` and (C,) statistics with negatives, zeros (both signs), zero
    variances, zero weights and magnitudes from ~1e-6 to ~1e6; ``specials`` adds inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    flat = x.view(-1)
    flat[::5] = 0.0
    flat[1::7] = -0.0
    flat[2::11] = 1.0e30
    flat[3::13] = -1.0e-40  # subnormal
    if specials:
        flat[4::17] = float("inf")
        flat[5::19] = float("-inf")
        flat[6::23] = float("nan")
    weight = torch.randn(c, generator=g) * 2
    weight[::4] = 0.0
    weight[1::6] = -weight[1::6].abs()
    bias = torch.randn(c, generator=g)
    bias[::3] = -0.0
    mean = torch.randn(c, generator=g) * 5
    var = torch.rand(c, generator=g) * torch.exp(torch.randn(c, generator=g) * 3)
    var[::5] = 0.0
    residual = torch.randn(shape, generator=g) * 4
    residual.view(-1)[::3] = -0.0
    return x, (weight, bias, mean, var), residual


def plain(x, params, eps, residual, relu):
    """The plain path as the ResNet writes it."""
    weight, bias, mean, var = params
    out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    if residual is not None:
        out += residual
    if relu:
        F.relu_(out)
    return out


# ------------------------------------------------------------------------------ the compiled op
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_op_bitwise_equals_plain(isa, shape, with_residual, relu, inplace):
    x, params, residual = make_case(shape, seed=sum(shape))
    residual = residual if with_residual else None
    for eps in (1e-5, 1e-3):
        want = plain(x, params, eps, residual, relu)
        if inplace:
            target = x.clone()
            assert torch.ops.mask2former.frozen_bn_act_(target, *params, eps, residual, relu) is None
            got = target
        else:
            got = torch.ops.mask2former.frozen_bn_act(x, *params, eps, residual, relu)
        assert_bitwise(got, want)


@pytest.mark.parametrize("relu", [False, True])
def test_op_infinities_and_nan(isa, relu):
    x, params, residual = make_case((2, 21, 7, 9), seed=3, specials=True)
    for res in (None, residual):
        got = torch.ops.mask2former.frozen_bn_act(x, *params, 1e-5, res, relu)
        assert_bitwise(got, plain(x, params, 1e-5, res, relu))


def test_relu_keeps_negative_zero_and_nan(isa):
    """torch.relu(-0.0) is -0.0 and relu(NaN) is NaN; the kernel's ReLU must agree (also in the
    vector tails: 37 elements per plane)."""
    x = torch.tensor([-0.0, 0.0, float("nan"), -float("nan"), -1.0, 2.0, float("inf"), -float("inf")] * 5)[:37]
    x = x.view(1, 1, 1, 37)
    one, zero = torch.ones(1), torch.zeros(1)
    # weight 1, bias -0.0, mean 0, var 1 - eps: alpha == 1, beta == -0.0, so y == x (x + -0.0 keeps -0.0)
    eps = 0.0
    out = torch.ops.mask2former.frozen_bn_act(x, one, -zero, zero, one, eps, None, True)
    assert_bitwise(out, torch.relu(plain(x, (one, -zero, zero, one), eps, None, False)))
    assert_bitwise(out[0, 0, 0, :2], torch.tensor([-0.0, 0.0]))
    assert torch.isnan(out[0, 0, 0, 2:4]).all()


def test_empty_input(op):
    x = torch.empty(0, 4, 3, 3)
    p = torch.ones(4)
    assert torch.ops.mask2former.frozen_bn_act(x, p, p, p, p, 1e-5, None, True).shape == x.shape


def test_parallel_chunks_match(op):
    """Many small planes: several threads each get a range of planes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        x, params, residual = make_case((4, 160, 17, 23), seed=7)
        got = torch.ops.mask2former.frozen_bn_act(x, *params, 1e-5, residual, True)
    finally:
        torch.set_num_threads(threads)
    assert_bitwise(got, plain(x, params, 1e-5, residual, True))


def test_opcheck_registration(op):
    """Schemas (the in-place variant mutates x), fake kernels and AOT dispatch."""
    x, params, residual = make_case((2, 5, 3, 7), seed=1)
    torch.library.opcheck(torch.ops.mask2former.frozen_bn_act, (x, *params, 1e-5, residual, True))
    torch.library.opcheck(torch.ops.mask2former.frozen_bn_act, (x, *params, 1e-5, None, False))
    torch.library.opcheck(torch.ops.mask2former.frozen_bn_act_, (x.clone(), *params, 1e-5, residual, True))


def test_errors_name_the_argument(op):
    fn = torch.ops.mask2former.frozen_bn_act
    x, (w, b, m, v), residual = make_case((2, 6, 4, 5))
    with pytest.raises(ValueError, match=r"x must be float32; got Double"):
        fn(x.double(), w, b, m, v, 1e-5, None, False)
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\) or channel-blocked \(N, C/B, H, W, B\); got shape \[6, 4, 5\]"):
        fn(x[0], w, b, m, v, 1e-5, None, False)
    with pytest.raises(ValueError, match=r"weight must be \(C,\) with C=6; got shape \[5\]"):
        fn(x, w[:5], b, m, v, 1e-5, None, False)
    with pytest.raises(ValueError, match=r"running_var must be float32; got Double"):
        fn(x, w, b, m, v.double(), 1e-5, None, False)
    with pytest.raises(ValueError, match=r"residual must have x's shape \[2, 6, 4, 5\]; got shape \[2, 6, 4, 4\]"):
        fn(x, w, b, m, v, 1e-5, residual[..., :4].contiguous(), False)
    with pytest.raises(ValueError, match=r"residual must be float32; got Half"):
        fn(x, w, b, m, v, 1e-5, residual.half(), False)
    with pytest.raises(RuntimeError, match=r"x must be contiguous"):
        fn(x.transpose(2, 3).contiguous().transpose(2, 3), w, b, m, v, 1e-5, None, False)
    with pytest.raises(RuntimeError, match=r"residual must be contiguous"):
        fn(x, w, b, m, v, 1e-5, residual.contiguous(memory_format=torch.channels_last), False)
    # the Python entry point checks shapes for every backend
    with pytest.raises(ValueError, match=r"bias must be \(C,\) with C=6"):
        frozen_bn_act(x, w, b[:2], m, v, 1e-5)
    with pytest.raises(ValueError, match=r"residual must have x's shape"):
        frozen_bn_act(x.double(), w.double(), b.double(), m.double(), v.double(), 1e-5, residual=residual[:1])


# ----------------------------------------------------------------- the Python entry point / gate
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entry_point_equals_reference(inplace, dtype):
    """Whatever backend it picks (compiled, reference, other dtypes) the result is the plain one."""
    x, params, residual = make_case((2, 19, 5, 37), seed=2)
    x, residual = x.to(dtype), residual.to(dtype)
    params = tuple(p.to(dtype) for p in params)
    want = plain(x, params, 1e-5, residual, True)
    target = x.clone()
    got = frozen_bn_act(target, *params, 1e-5, residual=residual, relu=True, inplace=inplace)
    assert_bitwise(got, want)
    if inplace:
        assert got.data_ptr() == target.data_ptr()
    else:
        assert_bitwise(target, x)


class _Spy:
    """Counts calls of the compiled ops and of the reference."""

    def __init__(self, monkeypatch):
        self.compiled = self.reference = 0
        real_ref = frozen_bn.frozen_bn_act_reference

        def ref(*args, **kwargs):
            self.reference += 1
            return real_ref(*args, **kwargs)

        real_uses = frozen_bn.frozen_bn_act_uses_compiled

        def uses(*args, **kwargs):
            used = real_uses(*args, **kwargs)
            self.compiled += int(used)
            return used

        monkeypatch.setattr(frozen_bn, "frozen_bn_act_reference", ref)
        monkeypatch.setattr(frozen_bn, "frozen_bn_act_uses_compiled", uses)


def test_compiled_kernel_used_when_self_check_passes(op, monkeypatch):
    monkeypatch.setattr(frozen_bn, "_self_check", {})
    if not frozen_bn_act_compiled():
        pytest.skip("the compiled kernel does not reproduce this torch's batch_norm bitwise here")
    spy = _Spy(monkeypatch)
    x, params, residual = make_case((1, 8, 6, 6))
    frozen_bn_act(x, *params, 1e-5, residual=residual, relu=True)
    assert (spy.compiled, spy.reference) == (1, 0)


def test_failed_self_check_falls_back_to_reference(op, monkeypatch):
    """A kernel that does not match the reference bitwise is never used."""
    monkeypatch.setattr(frozen_bn, "_self_check", {})
    monkeypatch.setattr(frozen_bn, "_run_self_check", lambda: False)
    assert not frozen_bn_act_compiled()
    spy = _Spy(monkeypatch)
    x, params, residual = make_case((1, 8, 6, 6))
    got = frozen_bn_act(x, *params, 1e-5, residual=residual, relu=True)
    assert (spy.compiled, spy.reference) == (0, 1)
    assert_bitwise(got, plain(x, params, 1e-5, residual, True))


def test_unavailable_compiled_op_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(frozen_bn, "_self_check", {})
    monkeypatch.setattr(state, "compiled_available", lambda device_type: False)
    assert not frozen_bn_act_compiled()
    spy = _Spy(monkeypatch)
    x, params, residual = make_case((1, 8, 6, 6))
    got = frozen_bn_act(x, *params, 1e-5, residual=residual, relu=True, inplace=True)
    assert (spy.compiled, spy.reference) == (0, 1)
    assert_bitwise(got, plain(make_case((1, 8, 6, 6))[0], params, 1e-5, residual, True))


def test_self_check_detects_a_differently_rounding_batch_norm(op, monkeypatch):
    """Were torch's batch_norm to round x * alpha and + beta separately (no FMA), the self-check
    must see that the kernel differs."""

    def batch_norm_without_fma(x, mean, var, weight, bias, training, momentum, eps):
        alpha = (var + eps).sqrt().reciprocal() * weight
        beta = bias - mean * alpha
        return x * alpha.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)

    assert frozen_bn._run_self_check()
    monkeypatch.setattr(frozen_bn.F, "batch_norm", batch_norm_without_fma)
    assert not frozen_bn._run_self_check()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 16), (1, 2, 4, 3, 8), (1, 3, 2, 5, 4), (1, 1, 1, 1, 16)])
def test_op_channel_blocked_layout(isa, shape, with_residual, relu):
    """(N, C/B, H, W, B): the NCHW result, laid out in channel blocks."""
    n, cb, h, w, b = shape
    x, params, residual = make_case((n, cb * b, h, w), seed=sum(shape), specials=True)
    to_blocks = lambda t: t.unflatten(1, (cb, b)).permute(0, 1, 3, 4, 2).clone(memory_format=torch.contiguous_format)
    residual = residual if with_residual else None
    want = to_blocks(plain(x, params, 1e-5, residual, relu))
    res_b = None if residual is None else to_blocks(residual)
    assert_bitwise(torch.ops.mask2former.frozen_bn_act(to_blocks(x), *params, 1e-5, res_b, relu), want)
    target = to_blocks(x)
    frozen_bn_act(target, *params, 1e-5, residual=res_b, relu=relu, inplace=True)
    assert_bitwise(target, want)
    assert_bitwise(frozen_bn.frozen_bn_act_reference(to_blocks(x), *params, 1e-5, res_b, relu), want)


# ------------------------------------------------------------------------------------ ResNet
def randomise_frozen_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.randn(c, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.05)
    return model


def resnet(depth, stem="basic", freeze_at=5):
    torch.manual_seed(depth)
    stem_cls, stem_out = (BasicStem, 64) if stem == "basic" else (DeepLabStem, 128)
    stages = make_resnet_stages(depth, stem_out_channels=stem_out, res2_out_channels=64 if depth < 50 else 256,
                                norm="FrozenBN")
    model = ResNet(stem_cls(3, stem_out, norm="FrozenBN"), stages,
                   out_features=["stem", "res2", "res3", "res4", "res5"], freeze_at=freeze_at)
    return set_fast_inference(randomise_frozen_bn(model.eval()))


def run_both(model, x, context=torch.no_grad):
    outs = {}
    for fast in (False, True):
        set_fast_inference(model, fast)
        with context():
            outs[fast] = model(x)
    set_fast_inference(model, True)
    return outs[False], outs[True]


@pytest.mark.parametrize(
    "depth,stem,context",
    [(50, "basic", torch.no_grad), (50, "basic", torch.inference_mode), (18, "basic", torch.no_grad),
     (50, "deeplab", torch.no_grad)],
)
def test_resnet_fast_path_bitwise_equals_plain(depth, stem, context):
    model = resnet(depth, stem)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    plain_out, fast_out = run_both(model, x, context)
    assert plain_out.keys() == fast_out.keys() == {"stem", "res2", "res3", "res4", "res5"}
    for k in plain_out:
        assert torch.equal(plain_out[k], fast_out[k]), k


def test_resnet_fast_path_batch_and_odd_sizes():
    model = resnet(50)
    x = torch.randn(2, 3, 67, 93, generator=torch.Generator().manual_seed(2))
    plain_out, fast_out = run_both(model, x)
    for k in plain_out:
        assert torch.equal(plain_out[k], fast_out[k]), k


def test_resnet_unfrozen_stages_with_grad_take_plain_path(monkeypatch):
    """freeze_at=2: later stages have trainable convs, so with autograd their outputs require grad
    and FrozenBatchNorm2d uses its training formula; the fused path must step aside."""
    model = resnet(50, freeze_at=2)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    plain_out, fast_out = run_both(model, x, context=torch.enable_grad)
    for k in plain_out:
        assert torch.equal(plain_out[k], fast_out[k]), k
    assert fast_out["res5"].requires_grad


def test_fast_path_runs_only_when_allowed(monkeypatch):
    model = resnet(50)
    x = torch.randn(1, 3, 32, 32)
    calls = []
    real = accel_resnet._norm_act
    monkeypatch.setattr(accel_resnet, "_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(x)
    bn_count = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # the first call at a size runs the NCHW path and, where available, checks the channel-blocked one
    assert len(calls) == bn_count * (2 if isinstance(model, accel_resnet.FastResNet) and verified(model) else 1)
    for setup in (lambda: set_fast_inference(model, False), lambda: model.train()):
        calls.clear()
        set_fast_inference(model.eval(), True)
        setup()
        with torch.no_grad():
            model(x)
            model(x.contiguous(memory_format=torch.channels_last))
        assert calls == []
    set_fast_inference(model.eval(), True)
    with torch.no_grad():
        model.double()(x.double())
    assert calls == []
    assert fast_inference_enabled(model)


def test_fast_inference_flag_propagates():
    model = resnet(18)
    set_fast_inference(model, False)
    assert not any(type(m).__module__.startswith("mask2former.accel") for m in model.modules())
    assert not fast_inference_enabled(model)
    set_fast_inference(model, True)
    assert fast_inference_enabled(model)


def test_conv2d_forward_act_without_frozen_norm_is_plain():
    conv = Conv2d(4, 6, 3, padding=1, bias=False, norm=torch.nn.GroupNorm(2, 6)).eval()
    x = torch.randn(1, 4, 5, 5)
    residual = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        want = F.relu_(conv(x) + residual)
        assert torch.equal(accel_resnet.conv_norm_act(conv, x, residual=residual, relu=True), want)


def test_torch_compile_fullgraph_keeps_fast_path_bitwise(op):
    """The fused ops trace (fake kernels, no graph break) and the compiled backbone gives the
    plain eager outputs."""
    torch._dynamo.reset()
    model = resnet(18)
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    plain_out, _ = run_both(model, x)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    for k in plain_out:
        assert torch.equal(plain_out[k], out[k]), k


def test_forward_hooks_still_see_the_plain_path():
    """A hook on a conv or its norm sees the same calls and tensors with fast_inference on."""
    model = resnet(50)
    x = torch.randn(1, 3, 32, 32)
    seen = {}
    block = model.res3[1]
    block.conv2.register_forward_hook(lambda m, a, out: seen.setdefault(fast, []).append(out.clone()))
    block.conv3.norm.register_forward_hook(lambda m, a, out: seen.setdefault(fast, []).append(out.clone()))
    for fast in (False, True):
        set_fast_inference(model, fast)
        with torch.no_grad():
            model(x)
    assert len(seen[True]) == len(seen[False]) == 2
    for a, b in zip(seen[False], seen[True]):
        assert torch.equal(a, b)
