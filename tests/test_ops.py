"""Compiled multi-scale deformable attention (mask2former/ops, issue 3): the CPU kernel against
the PyTorch reference (values and gradients), its torch.library registration (opcheck, autograd,
torch.compile, torch.export), input errors, backend selection (M2F_OPS), and the import graph
of mask2former/ops (acyclic; every module imports on its own).

The kernels are built once per machine and cached in the torch extensions dir (first build
~15 s); tests that need them are skipped with the reason when they cannot be built.
"""
import ast
import json
import warnings

import pytest
import torch

from mask2former.ops import backend_info, ms_deform_attn, ms_deform_attn_reference
from mask2former.ops.__main__ import main as ops_main
from mask2former.ops.backend import env
from tests.conftest import REPO, require_compiled_cpu_ops, run_python



@pytest.fixture(scope="module")
def op():
    """The compiled forward op; builds the kernels (once, cached on disk) or skips."""
    require_compiled_cpu_ops()
    return torch.ops.mask2former.ms_deform_attn


def make_inputs(shapes, n=2, lq=7, m=3, d=5, p=3, dtype=torch.float64, lo=-0.3, hi=1.3, seed=0):
    """Random inputs; locations uniform in [lo, hi] so some fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    nl = shapes.shape[0]
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, nl, p, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attw = torch.rand(n, lq, m, nl, p, generator=g, dtype=dtype)
    attw = attw / attw.sum((-1, -2), keepdim=True)
    return value, shapes, starts, loc, attw


def grads(fn, value, shapes, starts, loc, attw, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attw)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)


LEVELS = [
    [[6, 4], [3, 2], [1, 1]],  # includes a 1x1 level
    [[7, 5], [4, 3]],  # odd sizes
    [[1, 1]],
    [[13, 9], [7, 5], [4, 3], [2, 2]],
]


# --------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 5, 32])
@pytest.mark.parametrize("shapes", LEVELS)
def test_forward_matches_reference(op, isa, shapes, d, dtype):
    args = make_inputs(shapes, d=d, dtype=dtype)
    out = op(*args)
    ref = ms_deform_attn_reference(*args)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol(dtype))
    if dtype == torch.float32:
        assert (out - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 16, 32, 64])
def test_backward_matches_reference(op, isa, d, dtype):
    args = make_inputs(LEVELS[0], n=2, lq=9, m=2, d=d, p=4, dtype=dtype, seed=d)
    out, g = grads(ms_deform_attn, *args)
    ref_out, g_ref = grads(ms_deform_attn_reference, *args)
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), g, g_ref):
        # location gradients scale with the level size; compare relative to their magnitude
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a / scale, b / scale, **tol(dtype), msg=lambda m: f"grad {name}: {m}")


def test_exact_boundary_locations(op, isa):
    """Locations on the map edges, pixel centres and pixel edges (x*W - 0.5 integral or
    half-integral), just outside, and far outside / non-finite (must read zeros)."""
    shapes = [[4, 6], [1, 1], [3, 2]]
    value, shapes_t, starts, _, _ = make_inputs(shapes, n=1, lq=1, m=2, d=5, p=1)
    xs = []
    for h, w in shapes:
        for k in range(-1, max(h, w) + 2):
            xs += [k / w, (k + 0.5) / w]
    xs += [0.0, 1.0, -1e-7, 1 + 1e-7, -5.0, 7.0, 1e30, -1e30]
    grid = torch.tensor([(x, y) for x in xs for y in xs[:: max(1, len(xs) // 12)]], dtype=torch.float64)
    lq = grid.shape[0]
    loc = grid.view(1, lq, 1, 1, 1, 2).expand(1, lq, 2, len(shapes), 1, 2).contiguous()
    attw = torch.full((1, lq, 2, len(shapes), 1), 0.5, dtype=torch.float64)
    args = (value, shapes_t, starts, loc, attw)
    torch.testing.assert_close(op(*args), ms_deform_attn_reference(*args), atol=1e-12, rtol=1e-12)
    nan_loc = loc.clone()
    nan_loc[0, 0] = float("nan")
    out = op(value, shapes_t, starts, nan_loc, attw)
    assert torch.isfinite(out[0, 1:]).all()


@pytest.mark.parametrize("m", [1, 2])
def test_q_chunks_path_when_fewer_heads_than_threads(op, m):
    """N * M < threads: the backward also splits the queries (per-slice grad_value copies)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        args = make_inputs(LEVELS[3], n=1, lq=50, m=m, d=32, p=4)
        _, g = grads(ms_deform_attn, *args)
        _, g_ref = grads(ms_deform_attn_reference, *args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_empty_queries(op):
    value, shapes, starts, loc, attw = make_inputs(LEVELS[0], lq=0)
    out, g = grads(ms_deform_attn, value, shapes, starts, loc, attw)
    assert out.shape == (2, 0, 3 * 5)
    assert g[0].shape == value.shape and g[0].abs().sum() == 0


def test_gradcheck(op, isa):
    args = make_inputs([[3, 4], [2, 1]], n=1, lq=3, m=2, d=3, p=2, lo=-0.1, hi=1.1, seed=3)
    value, shapes, starts, loc, attw = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    assert torch.autograd.gradcheck(lambda v, l, a: op(v, shapes, starts, l, a), (value, loc, attw))


def test_opcheck_registration(op):
    """Schema, fake kernel, autograd registration and AOT dispatch of the custom op."""
    args = make_inputs(LEVELS[0], n=1, lq=4, m=2, d=4, p=2)
    value, shapes, starts, loc, attw = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    torch.library.opcheck(op, (value, shapes, starts, loc, attw))
    grad_out = torch.randn(1, 4, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.mask2former.ms_deform_attn_backward, (grad_out, *args))


def test_dispatch_uses_compiled_op_for_float_and_reference_otherwise(op):
    args = make_inputs(LEVELS[0], dtype=torch.float32)
    assert backend_info().describe("cpu") == "compiled CPU"
    torch.testing.assert_close(ms_deform_attn(*args), op(*args), atol=0, rtol=0)
    half = [t.bfloat16() if t.is_floating_point() else t for t in args]
    torch.testing.assert_close(ms_deform_attn(*half), ms_deform_attn_reference(*half), atol=0, rtol=0)


# ------------------------------------------------------------------------------ compile / export
class _Block(torch.nn.Module):
    """A value projection, the op and an output projection: enough to see graph breaks."""

    def __init__(self, c=8, m=2):
        super().__init__()
        self.m = m
        self.value_proj = torch.nn.Linear(c, c)
        self.out_proj = torch.nn.Linear(c, c)

    def forward(self, x, shapes, starts, loc, attw):
        n, s, c = x.shape
        value = self.value_proj(x).view(n, s, self.m, c // self.m)
        return self.out_proj(ms_deform_attn(value, shapes, starts, loc, attw))


def _block_inputs():
    _, shapes, starts, loc, attw = make_inputs(LEVELS[0], n=2, lq=5, m=2, d=4, p=2, dtype=torch.float32)
    x = torch.randn(2, int(shapes.prod(1).sum()), 8, generator=torch.Generator().manual_seed(5))
    return x, shapes, starts, loc, attw


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(op, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block()
    x, shapes, starts, loc, attw = _block_inputs()
    loc.requires_grad_(True)
    eager = block(x, shapes, starts, loc, attw)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), loc)
    compiled = torch.compile(block, fullgraph=True, backend=backend)  # fullgraph: graph breaks raise
    out = compiled(x, shapes, starts, loc, attw)
    (g_comp,) = torch.autograd.grad(out.square().sum(), loc)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_comp, g_eager, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_torch_export(op):
    torch.manual_seed(0)
    block = _Block().eval()
    inputs = _block_inputs()
    program = torch.export.export(block, inputs)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "mask2former.ms_deform_attn.default" in targets
    torch.testing.assert_close(program.module()(*inputs), block(*inputs), atol=1e-6, rtol=1e-6)
    other = _block_inputs()
    other = (other[0] * 2, *other[1:3], other[3].flip(1).contiguous(), other[4])
    torch.testing.assert_close(program.module()(*other), block(*other), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- errors
def test_errors_are_clear(op):
    value, shapes, starts, loc, attw = make_inputs(LEVELS[0], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="value must be contiguous"):
        op(value.transpose(0, 1).contiguous().transpose(0, 1), shapes, starts, loc, attw)
    with pytest.raises(RuntimeError, match="sampling_locations must be contiguous"):
        op(value, shapes, starts, loc.transpose(1, 2).contiguous().transpose(1, 2), attw)
    with pytest.raises(ValueError, match="must share a dtype"):
        op(value, shapes, starts, loc.double(), attw)
    with pytest.raises(ValueError, match="floating-point"):
        op(value.int(), shapes, starts, loc.int(), attw.int())
    with pytest.raises(ValueError, match="spatial_shapes sum to"):
        op(value[:, :-1].contiguous(), shapes, starts, loc, attw)
    with pytest.raises(ValueError, match="int64"):
        op(value, shapes.int(), starts, loc, attw)
    with pytest.raises(ValueError, match=r"sampling_locations must be \(N, Lq, M, L, P, 2\)"):
        op(value, shapes, starts, loc[:, :, :, :2].contiguous(), attw)
    with pytest.raises(ValueError, match=r"attention_weights must be \(N, Lq, M, L, P\)"):
        op(value, shapes, starts, loc, attw[..., :1].contiguous())
    bad_starts = starts.clone()
    bad_starts[-1] = value.shape[1]
    with pytest.raises(ValueError, match="lies outside"):
        op(value, shapes, bad_starts, loc, attw)
    # the Python entry point validates first (ValueError) and makes strided inputs contiguous
    with pytest.raises(ValueError, match="spatial_shapes sum to"):
        ms_deform_attn(value[:, :-1], shapes, starts, loc, attw)
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(ms_deform_attn(strided, shapes, starts, loc, attw), op(value, shapes, starts, loc, attw))


# ------------------------------------------------------------------------------------- backends
@pytest.mark.slow
def test_info_reports_compiled(op, ops_info_cli):
    """The compiled backend, and the CPU kernel variant it runs: M2F_OPS_CPU_ISA=generic caps it
    to generic on any machine (the ``isa`` fixture relies on this report)."""
    assert ops_info_cli.returncode == 0, ops_info_cli.stderr
    assert "cpu backend: compiled CPU" in ops_info_cli.stdout
    assert "cpu isa: generic\n" in ops_info_cli.stdout


def test_info_reports_reference_when_forced(fresh_backend, monkeypatch, capsys):
    monkeypatch.setenv("M2F_OPS", "reference")
    assert ops_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "M2F_OPS: reference\n" in out and "cpu backend: reference" in out
    assert "reason: M2F_OPS=reference\n" in out and "cpu isa:" not in out


def test_missing_compiler_falls_back_with_one_warning(fresh_backend, monkeypatch, tmp_path):
    monkeypatch.setenv("M2F_OPS", "auto")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    v = torch.randn(1, 5, 1, 2)
    sh, st = torch.tensor([[1, 1], [2, 2]]), torch.tensor([0, 1])
    loc, w = torch.rand(1, 3, 1, 2, 1, 2), torch.rand(1, 3, 1, 2, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(ms_deform_attn(v, sh, st, loc, w), ms_deform_attn_reference(v, sh, st, loc, w))
    msgs = [str(c.message) for c in caught if "mask2former.ops" in str(c.message)]
    assert len(msgs) == 1 and "C++ compiler not found" in msgs[0], msgs
    info = backend_info()
    assert not info.compiled and info.describe("cpu") == "reference"


def test_forced_reference_runs_the_reference_with_the_library_loaded(op, monkeypatch):
    """M2F_OPS=reference, set after the compiled library was loaded in this process: the public
    ms_deform_attn runs the reference (bitwise its result); without it, the compiled kernel."""
    import sys

    from mask2former.ops.backend import state

    module = sys.modules["mask2former.ops.ms_deform_attn"]  # the package attribute is the function
    calls = []

    def reference(*args):
        calls.append(1)
        return ms_deform_attn_reference(*args)

    monkeypatch.setattr(module, "ms_deform_attn_reference", reference)
    args = make_inputs(LEVELS[0], dtype=torch.float32)
    expected = ms_deform_attn_reference(*args)
    for mode, reference_calls in (("auto", 0), ("reference", 1), ("auto", 0)):
        monkeypatch.setenv("M2F_OPS", mode)
        calls.clear()
        out = ms_deform_attn(*args)
        assert backend_info().compiled and state.backend_info() is backend_info()  # still loaded
        assert len(calls) == reference_calls, mode
        if reference_calls:
            assert torch.equal(out, expected)


def test_compiled_mode_makes_missing_compiler_an_error(fresh_backend, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("M2F_OPS", "compiled")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert ops_main(["info"]) == 1
    err = capsys.readouterr().err
    assert "M2F_OPS=compiled" in err and "C++ compiler not found" in err


def test_invalid_mode_is_rejected(monkeypatch):
    monkeypatch.setenv("M2F_OPS", "fast")
    with pytest.raises(ValueError, match="M2F_OPS must be one of"):
        env.mode()


def test_extension_alias_points_to_the_new_homes():
    from mask2former.ops import _extension
    from mask2former.ops.backend import cuda_check, jit, sources, state, toolchain

    assert _extension.backend_info is state.backend_info and _extension.build is state.build
    assert _extension.compiled_available is state.compiled_available and _extension.mode is env.mode
    assert _extension.BackendInfo is jit.BackendInfo and _extension.sources is sources.sources
    assert _extension.build_cuda_sources_for_check is cuda_check.build_cuda_sources_for_check
    assert _extension._cuda_home is toolchain.cuda_home


# ------------------------------------------------------------------------------- import graph
OPS_DIR = REPO / "mask2former" / "ops"


def _ops_modules():
    """Dotted name -> file of every module under mask2former/ops (a package by its __init__.py)."""
    modules = {}
    for path in sorted(OPS_DIR.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph(modules):
    """Module -> the ops modules its import statements name, relative or absolute, at module level
    or inside a function (a lazy import closes a cycle just as well; it only fails later).
    ``from P import x`` counts as importing P.x when that is a module, else P. The implicit import
    of a module's parent packages is not counted: a package's __init__ is already running or
    done whenever one of its submodules is imported, so that edge meets no half-made module."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = sorted(t for t in targets if t in modules and t != name)
    return graph


def _find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_ops_import_graph_is_acyclic_and_layered():
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    graph = _import_graph(_ops_modules())
    ops = "mask2former.ops"
    # the parser sees the imports that exist (relative, from-package, inside a function)
    assert f"{ops}.backend.state" in graph[f"{ops}.frozen_bn"]
    assert f"{ops}.backend.state" in graph[f"{ops}._registration"]
    assert {f"{ops}.frozen_bn", f"{ops}.ms_deform_attn", f"{ops}._registration"} <= set(graph[ops])
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle in mask2former/ops: " + " -> ".join(cycle)
    # the build / backend layer knows nothing about the op modules
    for name, targets in graph.items():
        if name.startswith(f"{ops}.backend"):
            assert all(t.startswith(f"{ops}.backend") for t in targets), (name, targets)


_FRESH_IMPORTS = """
import importlib, json, random, sys, traceback, types
root, modules = json.loads(sys.argv[1])
failed = {}
for first in modules:
    for name in [m for m in sys.modules if m == "mask2former" or m.startswith("mask2former.")]:
        del sys.modules[name]
    # empty stand-ins for the parent packages, so no other __init__ runs first
    for name in ["mask2former"] + (["mask2former.ops"] if first != "mask2former.ops" else []):
        pkg = types.ModuleType(name)
        pkg.__path__ = [root + "/" + name.replace(".", "/")]
        sys.modules[name] = pkg
    rest = [m for m in modules if m != first]
    random.Random(first).shuffle(rest)
    try:
        for name in [first] + rest:
            importlib.import_module(name)
    except Exception:
        failed[first] = traceback.format_exc()
print(json.dumps(failed))
"""


@pytest.mark.slow
def test_each_ops_module_imports_on_its_own():
    """In a fresh interpreter, once per module: forget every mask2former module, import this one
    before anything else of mask2former (its parent packages are empty stand-ins; mask2former.ops
    itself is imported for real), then every other ops module in an order drawn from its name.
    torch stays imported between rounds (one interpreter keeps this test at a few seconds)."""
    res = run_python(["-c", _FRESH_IMPORTS, json.dumps([str(REPO), sorted(_ops_modules())])])
    assert res.returncode == 0, res.stderr
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert failed == {}, "\n".join(f"{name} first:\n{tb}" for name, tb in failed.items())
