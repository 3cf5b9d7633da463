"""CUDA kernel of multi-scale deformable attention (mask2former/ops, issue 3).

* Build checks that need no GPU: the CUDA sources compile and link for an explicit
  TORCH_CUDA_ARCH_LIST (skipped without nvcc; slow on a cold cache), and the backend report /
  one-time fallback warning for CUDA tensors.
* GPU tests (skipped when torch.cuda.is_available() is False, or when the CUDA kernel could not
  be built, with the reason): the compiled op against the PyTorch reference in float32 / float64
  / float16 / bfloat16 (values and gradients), gradcheck in float64, device-resident level
  metadata without synchronisation, torch.compile(fullgraph=True), opcheck, and input errors.
"""
import warnings
from pathlib import Path

import pytest
import torch

from mask2former.ops import BackendInfo, backend_info, check_ms_deform_attn_shapes, ms_deform_attn
from mask2former.ops import ms_deform_attn_reference
from mask2former.ops.backend import cuda_check, env, state, toolchain
from tests.conftest import require_compiled_cpu_ops, run_python, skip_or_fail_in_ci

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible (torch.cuda.is_available() is False)")

LEVELS = [
    [[6, 4], [3, 2], [1, 1]],  # includes a 1x1 level
    [[7, 5], [4, 3]],  # odd sizes
    [[1, 1]],
    [[13, 9], [7, 5], [4, 3], [2, 2]],
]


def _cuda_build_missing():
    return toolchain.missing_toolchain() or toolchain.cuda_toolchain_missing()


# ------------------------------------------------------------------------ build (no GPU needed)
@pytest.mark.slow
def test_cuda_sources_compile_for_explicit_arch():
    """Compile + link csrc/ with the CUDA kernel for sm_90 (cold: ~40 s on 2 cores; the build is
    cached by a hash of the sources, so a rerun without changes takes ~2 s)."""
    missing = _cuda_build_missing()
    if missing:
        pytest.skip(f"cannot compile CUDA sources: {missing}")
    res = cuda_check.build_cuda_sources_for_check("9.0")
    assert Path(res.library).is_file()
    assert res.arch_list == "9.0"
    if res.loaded:  # loading needs only the CUDA runtime, usually true even without a GPU
        assert res.cuda_kernel_registered
    print(f"cuda check build: {res.seconds:.1f} s, loaded={res.loaded} {res.load_error or ''}")


@pytest.mark.slow
def test_cuda_check_command_line():
    missing = _cuda_build_missing()
    if missing:
        pytest.skip(f"cannot compile CUDA sources: {missing}")
    res = run_python(["-m", "mask2former.ops", "build", "--cuda-check", "--arch-list", "9.0"])
    assert res.returncode == 0, res.stderr
    assert "compiled and linked for TORCH_CUDA_ARCH_LIST=9.0" in res.stdout


def test_cuda_check_reports_missing_toolchain(monkeypatch):
    monkeypatch.setattr(toolchain, "cuda_toolchain_missing", lambda: "simulated: no nvcc")
    with pytest.raises(RuntimeError, match="simulated: no nvcc"):
        cuda_check.build_cuda_sources_for_check("9.0")


@pytest.mark.slow
def test_info_reports_cuda_backend_state(ops_info_cli, capsys):
    res = ops_info_cli
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("cuda backend:"))
    info = backend_info()
    if info.cuda:
        assert line.startswith("cuda backend: compiled CUDA (TORCH_CUDA_ARCH_LIST=")
    else:
        assert line.startswith("cuda backend: reference (") and info.cuda_reason in line
        if not HAS_CUDA and info.compiled:
            assert "no CUDA device visible" in line
    from mask2former.ops.__main__ import _print_info

    _print_info(BackendInfo(True, True, False, "built", cuda_reason="M2F_OPS_CUDA=0"))
    assert "cuda backend: reference (M2F_OPS_CUDA=0)" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback warning where no CUDA kernel can be built")
def test_cuda_fallback_warns_once_unless_opted_out(monkeypatch):
    """Without a CUDA kernel, CUDA tensors run the reference with one warning saying why;
    M2F_OPS_CUDA=0 (an explicit choice) silences it."""
    require_compiled_cpu_ops()
    for opt in ("1", "0"):
        monkeypatch.setenv("M2F_OPS_CUDA", opt)
        monkeypatch.setattr(state, "_warned_cuda", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert state.compiled_available("cuda") is False
        msgs = [str(c.message) for c in caught if "mask2former.ops" in str(c.message)]
        if opt == "1":
            assert len(msgs) == 1, msgs
            assert "CUDA tensors use the PyTorch reference" in msgs[0] and "no CUDA device visible" in msgs[0]
        else:
            assert msgs == []


def test_device_mismatch_is_a_clear_error_without_data():
    """check_ms_deform_attn_shapes only looks at metadata: meta tensors show the device rules."""
    value = torch.empty(1, 5, 2, 4)
    shapes = torch.tensor([[1, 1], [2, 2]])
    starts = torch.tensor([0, 1])
    loc = torch.empty(1, 3, 2, 2, 1, 2)
    attw = torch.empty(1, 3, 2, 2, 1)
    check_ms_deform_attn_shapes(value, shapes, starts, loc, attw)
    with pytest.raises(ValueError, match="must be on one device"):
        check_ms_deform_attn_shapes(value, shapes, starts, loc.to("meta"), attw)
    with pytest.raises(ValueError, match="level_start_index must be on the CPU or on cpu"):
        check_ms_deform_attn_shapes(value, shapes, starts.to("meta"), loc, attw)
    # level tensors on the host are fine for any device of value
    meta = [t.to("meta") for t in (value, loc, attw)]
    check_ms_deform_attn_shapes(meta[0], shapes, starts, meta[1], meta[2])


_GPU_FALLBACK_SCRIPT = """
import warnings, torch
from mask2former.ops import backend_info, ms_deform_attn, ms_deform_attn_reference
from mask2former.ops.backend import jit
jit.want_cuda = lambda: "simulated: no CUDA kernel"
v = torch.randn(1, 5, 1, 2, device="cuda"); sh = torch.tensor([[1, 1], [2, 2]], device="cuda")
st = torch.tensor([0, 1], device="cuda")
loc = torch.rand(1, 3, 1, 2, 1, 2, device="cuda"); w = torch.rand(1, 3, 1, 2, 1, device="cuda")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        assert torch.equal(ms_deform_attn(v, sh, st, loc, w), ms_deform_attn_reference(v, sh, st, loc, w))
msgs = [str(c.message) for c in caught if "mask2former.ops" in str(c.message)]
print(len(msgs)); print(msgs[0] if msgs else "")
print(backend_info().describe("cpu"))
"""


@needs_gpu
def test_cuda_tensors_fall_back_to_reference_with_one_warning():
    """A GPU but no CUDA kernel (simulated): CUDA tensors run the reference, warning once why;
    the CPU kernel is still built."""
    if toolchain.missing_toolchain():
        skip_or_fail_in_ci(f"compiled ops need a toolchain: {toolchain.missing_toolchain()}")
    res = run_python(["-c", _GPU_FALLBACK_SCRIPT])
    assert res.returncode == 0, res.stderr
    count, msg, cpu = res.stdout.splitlines()[:3]
    assert count == "1" and "CUDA tensors use the PyTorch reference" in msg and "simulated" in msg
    assert cpu == "compiled CPU"


# ----------------------------------------------------------------------------------- GPU tests
@pytest.fixture(scope="module")
def op():
    """The compiled op with its CUDA kernel; skips (with the reason) when there is none."""
    if not HAS_CUDA:
        pytest.skip("no CUDA device visible")
    if env.mode() == "reference":
        pytest.skip("M2F_OPS=reference")
    info = backend_info()
    if not info.cuda:
        pytest.skip(f"compiled CUDA kernel unavailable: {info.cuda_reason}")
    return torch.ops.mask2former.ms_deform_attn


def make_inputs(shapes, n=2, lq=7, m=3, d=5, p=3, dtype=torch.float32, lo=-0.3, hi=1.3, seed=0, device="cuda"):
    """Random inputs on `device` (made in float64 on the CPU, then cast); locations uniform in
    [lo, hi] so some fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    nl = shapes.shape[0]
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, nl, p, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attw = torch.rand(n, lq, m, nl, p, generator=g, dtype=torch.float64)
    attw = attw / attw.sum((-1, -2), keepdim=True)
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in (value, shapes, starts, loc, attw))


def upcast(args, dtype=torch.float32):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in args)


def grads(fn, value, shapes, starts, loc, attw, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attw)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(out.device, out.dtype))
    return out.detach(), [t.grad for t in leaves]


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    # relative to the output scale, against the float32 reference on the same rounded inputs
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def assert_close_scaled(a, b, dtype, what):
    """a (any dtype) against b, both divided by max(1, max|b|) (location gradients grow with the
    level size)."""
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a.to(b.dtype) / scale, b / scale, **TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("d", [1, 3, 32, 64])
@pytest.mark.parametrize("shapes", LEVELS)
def test_forward_matches_reference(op, shapes, d, dtype):
    args = make_inputs(shapes, n=2, d=d, dtype=dtype, seed=d)
    out = op(*args)
    assert out.shape == (2, 7, 3 * d) and out.dtype == dtype and out.is_cuda
    if dtype in (torch.float32, torch.float64):
        ref = ms_deform_attn_reference(*args)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        if dtype == torch.float32:
            assert (out - ref).abs().max() <= 1e-4
    else:
        ref = ms_deform_attn_reference(*upcast(args))
        assert_close_scaled(out, ref, dtype, "output")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("d", [1, 3, 32, 64, 264])  # 264: more vector slices than warp lanes
def test_backward_matches_reference(op, d, dtype):
    args = make_inputs(LEVELS[0], n=2, lq=9, m=2, d=d, p=4, dtype=dtype, seed=d)
    out, g = grads(ms_deform_attn, *args)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref_out, g_ref = grads(ms_deform_attn_reference, *upcast(args, ref_dtype))
    assert_close_scaled(out, ref_out, dtype, "output")
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), g, g_ref):
        assert a.dtype == dtype
        assert_close_scaled(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("shapes", LEVELS[1:3])
def test_backward_odd_sizes_and_many_rows(op, shapes):
    args = make_inputs(shapes, n=3, lq=131, m=5, d=3, p=4, dtype=torch.float64, seed=3)
    out, g = grads(ms_deform_attn, *args)
    ref_out, g_ref = grads(ms_deform_attn_reference, *args)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    for a, b in zip(g, g_ref):
        assert_close_scaled(a, b, torch.float64, "grad")


def test_gradcheck_float64(op):
    args = make_inputs([[3, 4], [2, 1]], n=1, lq=3, m=2, d=3, p=2, dtype=torch.float64, lo=-0.1, hi=1.1, seed=3)
    value, shapes, starts, loc, attw = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    assert torch.autograd.gradcheck(lambda v, l, a: op(v, shapes, starts, l, a), (value, loc, attw))
    # level metadata on the host takes the other path into the kernel
    shapes_h, starts_h = shapes.cpu(), starts.cpu()
    assert torch.autograd.gradcheck(lambda v, l, a: op(v, shapes_h, starts_h, l, a), (value, loc, attw))


def test_large_batch(op):
    """No batch limit (no im2col step): N = 300 in one call."""
    args = make_inputs([[5, 3], [2, 2]], n=300, lq=4, m=2, d=8, p=2, dtype=torch.float32, seed=7)
    out, g = grads(ms_deform_attn, *args)
    ref_out, g_ref = grads(ms_deform_attn_reference, *args)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for a, b in zip(g, g_ref):
        assert_close_scaled(a, b, torch.float32, "grad")


def test_level_metadata_on_host_or_device(op):
    args = make_inputs(LEVELS[3], n=2, lq=6, m=2, d=32, p=3, seed=11)
    value, shapes, starts, loc, attw = args
    on_device = op(value, shapes, starts, loc, attw)
    on_host = op(value, shapes.cpu(), starts.cpu(), loc, attw)
    torch.testing.assert_close(on_device, on_host, atol=0, rtol=0)
    # more levels than fit in the kernel arguments (16): copied to the device asynchronously
    many = [[2, 1], [1, 1], [1, 3]] * 7  # 21 levels
    args = make_inputs(many, n=1, lq=5, m=2, d=4, p=2, seed=12)
    value, shapes, starts, loc, attw = args
    ref = ms_deform_attn_reference(*args)
    torch.testing.assert_close(op(value, shapes.cpu(), starts.cpu(), loc, attw), ref, **TOL[torch.float32])
    torch.testing.assert_close(op(*args), ref, **TOL[torch.float32])


def test_device_metadata_needs_no_synchronisation(op):
    """With spatial_shapes / level_start_index on the GPU, forward and backward through
    ms_deform_attn never synchronise with the device."""
    args = make_inputs(LEVELS[0], n=2, lq=8, m=2, d=32, p=4, seed=5)
    value, shapes, starts, loc, attw = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    grad_out = torch.randn(2, 8, 64, device="cuda")
    ms_deform_attn(value, shapes, starts, loc, attw)  # warm-up (build, first-call work)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(value, shapes, starts, loc, attw)
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.detach(), ms_deform_attn_reference(*args), **TOL[torch.float32])


def test_invalid_device_metadata_reads_zeros(op):
    """Device-resident levels are not validated on the host (that would need a sync); a level
    outside value is treated as empty instead of being read out of bounds."""
    value, shapes, starts, loc, attw = make_inputs([[3, 4], [2, 2]], n=1, lq=4, m=1, d=4, p=2, seed=2)
    bad = starts.clone()
    bad[1] = 13  # level 1 (2x2) would end at 17 > S = 16
    out = op(value, shapes, bad, loc, attw)
    masked = attw.clone()
    masked[:, :, :, 1] = 0
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, starts, loc, masked), **TOL[torch.float32])
    # on the host the same metadata is an error
    with pytest.raises(ValueError, match="lies outside"):
        op(value, shapes.cpu(), bad.cpu(), loc, attw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_misaligned_inputs(op, dtype):
    """A contiguous view with an odd storage offset: the kernels fall back to narrower loads."""
    value, shapes, starts, loc, attw = make_inputs(LEVELS[0], n=2, lq=5, m=2, d=32, p=2, dtype=dtype, seed=9)
    buf = torch.empty(value.numel() + 1, device="cuda", dtype=dtype)
    buf[1:] = value.flatten()
    shifted = buf[1:].view(value.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    torch.testing.assert_close(op(shifted, shapes, starts, loc, attw), op(value, shapes, starts, loc, attw))
    _, g = grads(ms_deform_attn, shifted, shapes, starts, loc, attw)
    _, g_ref = grads(ms_deform_attn, value, shapes, starts, loc, attw)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)


def test_exact_boundary_locations(op):
    """Edges, pixel centres, just outside, far outside and non-finite locations (forward only:
    at cell edges the location gradient is one-sided and depends on rounding / FMA)."""
    shapes = [[4, 6], [1, 1], [3, 2]]
    value, shapes_t, starts, _, _ = make_inputs(shapes, n=1, lq=1, m=2, d=5, p=1, dtype=torch.float64)
    xs = []
    for h, w in shapes:
        for k in range(-1, max(h, w) + 2):
            xs += [k / w, (k + 0.5) / w]
    xs += [0.0, 1.0, -1e-7, 1 + 1e-7, -5.0, 7.0, 1e30, -1e30]
    grid = torch.tensor([(x, y) for x in xs for y in xs[:: max(1, len(xs) // 12)]], dtype=torch.float64)
    lq = grid.shape[0]
    loc = grid.view(1, lq, 1, 1, 1, 2).expand(1, lq, 2, len(shapes), 1, 2).contiguous().cuda()
    attw = torch.full((1, lq, 2, len(shapes), 1), 0.5, dtype=torch.float64, device="cuda")
    args = (value, shapes_t, starts, loc, attw)
    torch.testing.assert_close(op(*args), ms_deform_attn_reference(*args), atol=1e-12, rtol=1e-12)
    nan_loc = loc.clone()
    nan_loc[0, 0] = float("nan")
    out = op(value, shapes_t, starts, nan_loc, attw)
    assert torch.isfinite(out[0, 1:]).all() and (out[0, 0] == 0).all()
    g = torch.ones_like(out)
    _, g_loc, g_w = torch.ops.mask2former.ms_deform_attn_backward(g, value, shapes_t, starts, nan_loc, attw)
    assert (g_loc[0, 0] == 0).all() and (g_w[0, 0] == 0).all()


def test_empty_inputs(op):
    value, shapes, starts, loc, attw = make_inputs(LEVELS[0], lq=0)
    out, g = grads(ms_deform_attn, value, shapes, starts, loc, attw)
    assert out.shape == (2, 0, 3 * 5)
    assert g[0].shape == value.shape and g[0].abs().sum() == 0
    value, shapes, starts, loc, attw = make_inputs(LEVELS[0], n=0)
    assert op(value, shapes, starts, loc, attw).shape == (0, 7, 15)


def test_dispatch_uses_cuda_kernel_for_all_float_dtypes(op):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        args = make_inputs(LEVELS[0], dtype=dtype)
        torch.testing.assert_close(ms_deform_attn(*args), op(*args), atol=0, rtol=0)
    assert backend_info().describe("cuda") == "compiled CUDA"


def test_opcheck_registration(op):
    args = make_inputs(LEVELS[0], n=1, lq=4, m=2, d=4, p=2, dtype=torch.float64)
    value, shapes, starts, loc, attw = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    torch.library.opcheck(op, (value, shapes, starts, loc, attw))
    grad_out = torch.randn(1, 4, 8, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.mask2former.ms_deform_attn_backward, (grad_out, *args))


class _Block(torch.nn.Module):
    def __init__(self, c=8, m=2):
        super().__init__()
        self.m = m
        self.value_proj = torch.nn.Linear(c, c)
        self.out_proj = torch.nn.Linear(c, c)

    def forward(self, x, shapes, starts, loc, attw):
        n, s, c = x.shape
        value = self.value_proj(x).view(n, s, self.m, c // self.m)
        return self.out_proj(ms_deform_attn(value, shapes, starts, loc, attw))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(op, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block().cuda()
    _, shapes, starts, loc, attw = make_inputs(LEVELS[0], n=2, lq=5, m=2, d=4, p=2)
    x = torch.randn(2, int(shapes.prod(1).sum()), 8, device="cuda")
    loc.requires_grad_(True)
    eager = block(x, shapes, starts, loc, attw)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), loc)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(x, shapes, starts, loc, attw)
    (g_comp,) = torch.autograd.grad(out.square().sum(), loc)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_comp, g_eager, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_errors_are_clear(op):
    value, shapes, starts, loc, attw = make_inputs(LEVELS[0])
    with pytest.raises(RuntimeError, match="value must be contiguous"):
        op(value.transpose(0, 1).contiguous().transpose(0, 1), shapes, starts, loc, attw)
    with pytest.raises(RuntimeError, match="sampling_locations must be contiguous"):
        op(value, shapes, starts, loc.transpose(1, 2).contiguous().transpose(1, 2), attw)
    with pytest.raises(RuntimeError, match="attention_weights must be contiguous"):
        op(value, shapes, starts, loc, attw.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="must be on one device"):
        op(value, shapes, starts, loc.cpu(), attw)
    with pytest.raises(RuntimeError, match="both on the CPU or both on cuda"):
        op(value, shapes, starts.cpu(), loc, attw)
    with pytest.raises(ValueError, match="int64"):
        op(value, shapes.int(), starts, loc, attw)
    with pytest.raises(ValueError, match="must share a dtype"):
        op(value, shapes, starts, loc.half(), attw)
    with pytest.raises(ValueError, match="spatial_shapes sum to"):
        op(value[:, :-1].contiguous(), shapes.cpu(), starts.cpu(), loc, attw)
    grad_out = torch.randn(2, 7, 15, device="cuda")
    with pytest.raises(RuntimeError, match="grad_output must be contiguous"):
        torch.ops.mask2former.ms_deform_attn_backward(
            grad_out.transpose(0, 1).contiguous().transpose(0, 1), value, shapes, starts, loc, attw
        )
    with pytest.raises(RuntimeError, match="grad_output must be on"):
        torch.ops.mask2former.ms_deform_attn_backward(grad_out.cpu(), value, shapes, starts, loc, attw)
    # the Python entry point: ValueError before any kernel runs; strided inputs are made contiguous
    with pytest.raises(ValueError, match="must be on one device"):
        ms_deform_attn(value, shapes, starts, loc.cpu(), attw)
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(ms_deform_attn(strided, shapes, starts, loc, attw), op(value, shapes, starts, loc, attw))
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="must be on one device"):
            op(value, shapes, starts, loc.to("cuda:1"), attw)
