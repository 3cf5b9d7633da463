"""Inference-only ``mask2former::ms_deform_attn_offsets`` and ``ms_deform_attn_from_offsets``:
the locations ``reference + offset / (W, H)`` computed inside the CPU kernel give bitwise the
output of computing them with torch and calling the compiled ``ms_deform_attn`` (the plain
path), for every CPU kernel variant; the Python entry point falls back to the plain path when
the op is unavailable or gradients are needed; the op's registration (opcheck, fake kernel,
torch.compile) and its input errors.

Tests that need the compiled kernels skip, with the reason, when
``mask2former.ops.backend_info().cpu`` is False.
"""
import pytest
import torch

from mask2former.layers import MSDeformAttn
from mask2former.ops import (
    check_ms_deform_attn_offsets_shapes,
    ms_deform_attn_from_offsets,
    ms_deform_attn_reference,
)
from mask2former.ops.backend import state
from tests.conftest import require_compiled_cpu_ops

OP_NAME = "mask2former::ms_deform_attn_offsets"

# (H, W) per level, paired with a number of points: L = 1..4, P = 1..4, non-square levels
LEVELS_AND_POINTS = [
    ([[7, 5]], 1),
    ([[6, 4], [3, 2]], 2),
    ([[13, 9], [7, 5], [4, 3]], 3),
    ([[10, 15], [5, 8], [3, 4], [1, 1]], 4),
    ([[9, 13], [5, 7], [3, 4]], 4),
]


@pytest.fixture(scope="module")
def op():
    """The compiled op; builds the kernels (once, cached on disk) or skips."""
    require_compiled_cpu_ops()
    return torch.ops.mask2former.ms_deform_attn_offsets


def make_inputs(levels, n=2, lq=11, m=3, d=8, p=2, dtype=torch.float32, ref_layout="expanded", seed=0):
    """value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights.

    Offsets are in pixels, up to ~0.7 of the level size, so a good part of the samples falls
    outside their level. ref_layout: "expanded" (1, Lq, 1, 2) expanded to (N, Lq, L, 2), strides
    0 on N and L, as the encoder passes it; "contiguous"; "strided" (a permuted view);
    "broadcast" (1, Lq, 1, 2), not expanded (for the Python entry point only)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s, nl = int(shapes.prod(1).sum()), shapes.shape[0]
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    scale = shapes.flip(-1).to(dtype)[None, None, None, :, None, :] * 0.35
    offsets = torch.randn(n, lq, m, nl, p, 2, generator=g, dtype=dtype) * scale
    weights = torch.rand(n, lq, m, nl, p, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    if ref_layout in ("expanded", "broadcast"):
        ref = torch.rand(1, lq, 1, 2, generator=g, dtype=dtype)
        if ref_layout == "expanded":
            ref = ref.expand(n, lq, nl, 2)
    elif ref_layout == "contiguous":
        ref = torch.rand(n, lq, nl, 2, generator=g, dtype=dtype)
    elif ref_layout == "strided":
        ref = torch.rand(2, nl, n, lq + 3, generator=g, dtype=dtype)[..., 1: lq + 1].permute(2, 3, 1, 0)
        assert not ref.is_contiguous() and ref.shape == (n, lq, nl, 2)
    else:
        raise ValueError(ref_layout)
    return value, shapes, starts, ref, offsets, weights


def torch_locations(ref, offsets, shapes):
    """The locations exactly as MSDeformAttn computed them before the fused op."""
    normalizer = shapes.flip(-1).to(offsets.dtype)
    return ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]


def plain(value, shapes, starts, ref, offsets, weights):
    """Torch locations and the compiled ms_deform_attn: what the new op must reproduce bitwise."""
    return torch.ops.mask2former.ms_deform_attn(value, shapes, starts, torch_locations(ref, offsets, shapes), weights)


def ops_called(fn):
    """fn's result and the names of the operators it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


# --------------------------------------------------------------------------------------- bitwise
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("levels,p", LEVELS_AND_POINTS)
@pytest.mark.parametrize("d", [32, 8, 5])
def test_op_is_bitwise_torch_locations_and_ms_deform_attn(op, isa, n, levels, p, d):
    for dtype in (torch.float32, torch.float64):
        for layout in ("expanded", "contiguous", "strided"):
            args = make_inputs(levels, n=n, d=d, p=p, dtype=dtype, ref_layout=layout, seed=d + p)
            want = plain(*args)
            got = op(*args)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got, want), (dtype, layout)
            # some samples fall outside their level, some inside
            loc = torch_locations(args[3], args[4], args[1])
            outside = ((loc < 0) | (loc > 1)).any(-1)
            assert outside.any() and not outside.all()


@pytest.mark.parametrize("levels,p", LEVELS_AND_POINTS[2:])
def test_python_entry_point_uses_op_and_is_bitwise(op, isa, levels, p):
    """ms_deform_attn_from_offsets (what MSDeformAttn calls) takes the op for every reference
    layout, the unexpanded broadcast one included, under no_grad, inference_mode, and with grad
    mode on but nothing requiring grad."""
    for layout in ("expanded", "contiguous", "strided", "broadcast"):
        args = make_inputs(levels, n=2, d=8, p=p, ref_layout=layout, seed=p)
        want = plain(*args[:3], args[3].expand(2, -1, len(levels), 2), *args[4:])
        for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
            with ctx():
                got, names = ops_called(lambda: ms_deform_attn_from_offsets(*args))
            assert OP_NAME in names, (layout, ctx)
            assert torch.equal(got, want), (layout, ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_aligned_and_extreme_offsets(op, isa, dtype):
    """Reference points at pixel centres with integer and half-integer offsets land exactly on
    pixel centres and edges (where floor() decides which corners count), the level borders, and
    just / far outside; plus non-finite and huge offsets (read zeros)."""
    levels = [[4, 6], [3, 5], [1, 1], [5, 2]]
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    h, w = levels[0]
    ys, xs = torch.meshgrid((torch.arange(h, dtype=dtype) + 0.5) / h, (torch.arange(w, dtype=dtype) + 0.5) / w,
                            indexing="ij")
    centres = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)  # (Lq, 2)
    lq, nl = centres.shape[0], len(levels)
    steps = torch.tensor([-7, -6.5, -1, -0.5, -0.25, 0, 0.5, 1, 1.5, 2, 6.5, 7, 1e30, float("inf"),
                          float("nan"), -1e-7, 1e-7], dtype=dtype)
    g = torch.Generator().manual_seed(0)
    p = 4
    idx = torch.randint(0, steps.numel(), (1, lq, 2, nl, p, 2), generator=g)
    offsets = steps[idx]
    ref = centres[None, :, None].expand(1, lq, nl, 2)
    value = torch.randn(1, int(shapes.prod(1).sum()), 2, 8, generator=g, dtype=dtype)
    weights = torch.rand(1, lq, 2, nl, p, generator=g, dtype=dtype)
    args = (value, shapes, starts, ref, offsets, weights)
    got = op(*args)
    assert torch.equal(got, plain(*args))
    assert torch.isfinite(got).all()


def test_encoder_sized_call_is_bitwise(op, isa):
    """The deformable encoder's layout at a smaller image: Lq = S queries at the pixel centres
    of all levels, M = 8 heads of D = 32, several threads' worth of work items."""
    levels = [(50, 76), (25, 38), (13, 19)]
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    pts = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        pts.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    ref = torch.cat(pts)[None, :, None].expand(1, s, 3, 2)
    g = torch.Generator().manual_seed(1)
    value = torch.randn(1, s, 8, 32, generator=g)
    offsets = torch.randn(1, s, 8, 3, 4, 2, generator=g) * 4
    weights = torch.softmax(torch.randn(1, s, 8, 12, generator=g), -1).view(1, s, 8, 3, 4)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            assert torch.equal(op(value, shapes, starts, ref, offsets, weights),
                               plain(value, shapes, starts, ref, offsets, weights))
    finally:
        torch.set_num_threads(threads)


def test_empty_queries_and_batch(op):
    for n, lq in ((2, 0), (0, 5)):
        value, shapes, starts, ref, offsets, weights = make_inputs(LEVELS_AND_POINTS[1][0], n=max(n, 1), lq=lq)
        if n == 0:
            value, ref, offsets, weights = value[:0], ref[:0], offsets[:0], weights[:0]
        out = op(value, shapes, starts, ref, offsets, weights)
        assert out.shape == (n, lq, value.shape[2] * value.shape[3])


# ---------------------------------------------------------------------------------- MSDeformAttn
def _module_and_inputs(seed=0, n=2):
    torch.manual_seed(seed)
    levels = [(12, 17), (6, 9), (3, 5)]
    module = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=3).eval()
    with torch.no_grad():  # offsets and weights that depend on the query (the init's are constant)
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.attention_weights.weight.normal_(0, 0.5)
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    query, value_in = torch.randn(n, s, 64), torch.randn(n, s, 64)
    ref = torch.rand(1, s, 1, 2).expand(n, s, 3, 2)
    mask = torch.rand(n, s) < 0.1
    return module, (query, ref, value_in, shapes, starts, mask)


def test_module_fast_inference_flag(op, isa):
    """MSDeformAttn: fast_inference=True runs the op and equals the plain path bitwise;
    False never runs it."""
    from mask2former.accel import set_fast_inference

    module, args = _module_and_inputs()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            set_fast_inference(module, False)
            want, names = ops_called(lambda: module(*args))
            assert OP_NAME not in names and "mask2former::ms_deform_attn" in names
            set_fast_inference(module, True)
            got, names = ops_called(lambda: module(*args))
            assert OP_NAME in names
            assert torch.equal(got, want)
            got_nomask = module(*args[:5])
            set_fast_inference(module, False)
            assert torch.equal(got_nomask, module(*args[:5]))


def test_module_training_takes_the_autograd_path(op):
    """With parameters that require grad the op is not used and gradients flow, equal to the
    plain path's."""
    from mask2former.accel import set_fast_inference

    module, args = _module_and_inputs(n=1)
    grads = []
    for fast in (True, False):
        set_fast_inference(module, fast)
        module.zero_grad()
        out, names = ops_called(lambda: module(*args))
        assert OP_NAME not in names
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- fallback
def test_fallback_when_op_unavailable(monkeypatch):
    """No compiled kernel (M2F_OPS=reference, or compiled_available False): the plain
    computation with the reference op, bitwise. Runs with or without a compiler."""
    args = make_inputs(LEVELS_AND_POINTS[2][0], p=3, ref_layout="broadcast")
    want = ms_deform_attn_reference(*args[:3], torch_locations(args[3], args[4], args[1]), args[5])
    monkeypatch.setenv("M2F_OPS", "reference")
    with torch.no_grad():
        got, names = ops_called(lambda: ms_deform_attn_from_offsets(*args))
    assert OP_NAME not in names
    assert torch.equal(got, want)
    monkeypatch.delenv("M2F_OPS")
    monkeypatch.setattr(state, "compiled_available", lambda device_type: False)
    with torch.no_grad():
        got, names = ops_called(lambda: ms_deform_attn_from_offsets(*args))
    assert OP_NAME not in names
    assert torch.equal(got, want)


def test_fallback_when_grad_is_needed(op):
    """An input that requires grad under grad mode: torch locations + ms_deform_attn (with its
    autograd); the same output and gradients as the plain path. Under no_grad the op runs."""
    value, shapes, starts, ref, offsets, weights = make_inputs(LEVELS_AND_POINTS[3][0], p=4)
    for which in range(4):
        leaves = [t.clone().requires_grad_(i == which) for i, t in enumerate((value, ref, offsets, weights))]
        out, names = ops_called(lambda: ms_deform_attn_from_offsets(leaves[0], shapes, starts, *leaves[1:]))
        assert OP_NAME not in names and out.requires_grad
        assert torch.equal(out.detach(), plain(value, shapes, starts, ref, offsets, weights))
        (grad,) = torch.autograd.grad(out.square().sum(), leaves[which])
        plain_leaves = [t.clone().requires_grad_(i == which) for i, t in enumerate((value, ref, offsets, weights))]
        plain_locs = torch_locations(*plain_leaves[1:3], shapes)
        plain_out = torch.ops.mask2former.ms_deform_attn(plain_leaves[0], shapes, starts, plain_locs, plain_leaves[3])
        (plain_grad,) = torch.autograd.grad(plain_out.square().sum(), plain_leaves[which])
        assert torch.equal(grad, plain_grad)
        with torch.no_grad():
            _, names = ops_called(lambda: ms_deform_attn_from_offsets(leaves[0], shapes, starts, *leaves[1:]))
        assert OP_NAME in names


def test_fallback_for_other_dtypes_and_fused_false(op):
    """bfloat16, mixed dtypes and fused=False compute the locations with torch."""
    args = make_inputs(LEVELS_AND_POINTS[1][0])
    with torch.no_grad():
        out, names = ops_called(lambda: ms_deform_attn_from_offsets(*args, fused=False))
        assert OP_NAME not in names and torch.equal(out, plain(*args))
        mixed = (*args[:3], args[3].double(), *args[4:])  # float64 reference points: float64 locations
        with pytest.raises(ValueError, match="must share a dtype"):
            ms_deform_attn_from_offsets(*mixed)  # as the plain path: locations vs value dtype
        half = [t.bfloat16() if t.is_floating_point() else t for t in args]
        out, names = ops_called(lambda: ms_deform_attn_from_offsets(*half))
        assert OP_NAME not in names
        assert torch.equal(out, ms_deform_attn_reference(*half[:3], torch_locations(*half[3:5], half[1]), half[5]))


def test_raw_op_refuses_autograd(op):
    value, shapes, starts, ref, offsets, weights = make_inputs(LEVELS_AND_POINTS[0][0], p=1)
    with pytest.raises(RuntimeError, match="inference-only"):
        op(value.requires_grad_(), shapes, starts, ref, offsets, weights)
    with torch.no_grad():
        assert torch.equal(op(value, shapes, starts, ref, offsets, weights),
                           plain(value.detach(), shapes, starts, ref, offsets, weights))


# ---------------------------------------------------------------------------------------- errors
def test_op_errors_name_the_argument(op):
    value, shapes, starts, ref, offsets, weights = make_inputs(LEVELS_AND_POINTS[2][0], p=3)
    with pytest.raises(ValueError, match=r"reference_points must be \(N, Lq, L, 2\)"):
        op(value, shapes, starts, ref[:, :, :2], offsets, weights)
    with pytest.raises(ValueError, match=r"reference_points must be \(N, Lq, L, 2\)"):
        op(value, shapes, starts, ref[:1, :, None], offsets, weights)  # the op does not broadcast
    with pytest.raises(ValueError, match="reference_points must have value's dtype"):
        op(value, shapes, starts, ref.double(), offsets, weights)
    with pytest.raises(ValueError, match=r"sampling_offsets must be \(N, Lq, M, L, P, 2\)"):
        op(value, shapes, starts, ref, offsets[:, :, :, :2].contiguous(), weights)
    with pytest.raises(RuntimeError, match="sampling_offsets must be contiguous"):
        op(value, shapes, starts, ref, offsets.transpose(1, 2).contiguous().transpose(1, 2), weights)
    with pytest.raises(ValueError, match="value, sampling_offsets and attention_weights must share a dtype"):
        op(value, shapes, starts, ref, offsets.double(), weights)
    with pytest.raises(ValueError, match=r"attention_weights must be \(N, Lq, M, L, P\)"):
        op(value, shapes, starts, ref, offsets, weights[..., :1].contiguous())
    with pytest.raises(ValueError, match=r"value must be \(N, S, M, D\)"):
        op(value[0], shapes, starts, ref, offsets, weights)
    with pytest.raises(ValueError, match="spatial_shapes sum to"):
        op(value[:, :-1].contiguous(), shapes, starts, ref, offsets, weights)
    with pytest.raises(ValueError, match="int64"):
        op(value, shapes.int(), starts, ref, offsets, weights)
    with pytest.raises(ValueError, match=r"level_start_index must be \(L,\)"):
        op(value, shapes, starts[:2], ref, offsets, weights)


def test_python_errors_name_the_argument(op):
    """The entry point (fast path) and the fake kernel's check raise ValueError naming the argument."""
    value, shapes, starts, ref, offsets, weights = make_inputs(LEVELS_AND_POINTS[2][0], p=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"reference_points must be \(N, Lq, L, 2\)"):
            ms_deform_attn_from_offsets(value, shapes, starts, ref[:, :, :2], offsets, weights)
        with pytest.raises(ValueError, match=r"sampling_offsets must be \(N, Lq, M, L, P, 2\)"):
            ms_deform_attn_from_offsets(value, shapes, starts, ref, offsets[..., 0], weights)
        with pytest.raises(ValueError, match=r"attention_weights must have shape"):
            ms_deform_attn_from_offsets(value, shapes, starts, ref, offsets, weights[:, :, :1])
        with pytest.raises(ValueError, match="spatial_shapes sum to"):
            ms_deform_attn_from_offsets(value[:, :-1], shapes, starts, ref, offsets, weights)
    meta = [t.to("meta") for t in (value, shapes, starts, ref, offsets, weights)]
    check_ms_deform_attn_offsets_shapes(*meta)
    with pytest.raises(ValueError, match=r"sampling_offsets \(.*\) disagrees with value"):
        check_ms_deform_attn_offsets_shapes(meta[0][:, :, :1], *meta[1:])


# --------------------------------------------------------------------------------- registration
def test_opcheck(op):
    """Schema, fake kernel and AOT dispatch, with an expanded (stride 0) and a strided reference."""
    for layout in ("expanded", "strided"):
        for dtype in (torch.float32, torch.float64):
            args = make_inputs(LEVELS_AND_POINTS[2][0], n=2, lq=4, m=2, d=4, p=3, dtype=dtype, ref_layout=layout)
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(op):
    torch._dynamo.reset()
    args = make_inputs(LEVELS_AND_POINTS[3][0], p=4, ref_layout="broadcast")
    fn = torch.compile(ms_deform_attn_from_offsets, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, names = ops_called(lambda: fn(*args))
    assert OP_NAME in names
    assert torch.equal(got, plain(*args[:3], args[3].expand(2, -1, 4, 2), *args[4:]))
    torch._dynamo.reset()
