"""The ahead-of-time build of the compiled ops (``setup.py`` with ``M2F_BUILD_OPS=1``) and how the
backend loads it (mask2former/ops/backend/aot.py, issue 18).

The slow test builds the ops through setup.py from a copy of the sources in a temporary directory
(the checkout is never touched; one CPU-only build, ~40 s on 2 cores), then loads that library in
fresh processes (``M2F_OPS_LIBRARY``): ``ms_deform_attn`` against the reference, no JIT build, and
``python -m mask2former.ops info`` / ``build`` naming the ahead-of-time build. The others compile
nothing: setup.py without M2F_BUILD_OPS (no extension, no torch import), what it would compile,
where the library is looked for, and how a prebuilt library that does not fit is refused (JIT
fallback with one warning; an error under ``M2F_OPS=compiled``).
"""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mask2former.ops.__main__ import main as ops_main
from mask2former.ops.backend import aot, sources, toolchain
from tests.conftest import REPO, require_compiled_cpu_ops, reset_ops_backend, run_python, skip_or_fail_in_ci

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def copy_project(dst: Path) -> Path:
    """What setup.py needs (setup.py, pyproject.toml, README.md, mask2former/) copied to a new ``dst``."""
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "mask2former", dst / "mask2former",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    return dst


def setup_py(project: Path, build: Path, *extra, env=None) -> subprocess.CompletedProcess:
    """``python setup.py build_ext`` in ``project`` into ``build``/lib; prints the torch and
    mask2former modules it imported as the last line of stdout."""
    code = ("import runpy, sys; sys.argv = ['setup.py', 'build_ext', '--build-lib', sys.argv[1], '--build-temp', "
            "sys.argv[2]] + sys.argv[3:]; runpy.run_path('setup.py', run_name='__main__'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mask2former', '_m2f_ops_backend')))")
    environ = {k: v for k, v in os.environ.items() if k not in ("M2F_BUILD_OPS", "TORCH_CUDA_ARCH_LIST")}
    return subprocess.run([sys.executable, "-c", code, str(build / "lib"), str(build / "tmp"), *extra], cwd=project,
                          env={**environ, **(env or {})}, capture_output=True, text=True, timeout=900)


def marker(build_id: str, archs: str = "none") -> bytes:
    """The build record csrc/library.cpp compiles into an ahead-of-time build."""
    return b"\x7fELF junk\0m2f_aot_build_id=" + f"{build_id};cuda_archs={archs};".encode() + b"\0more"


@pytest.fixture(scope="module")
def aot_library(tmp_path_factory) -> Path:
    """The ops built by ``M2F_BUILD_OPS=1 python setup.py build_ext`` from a copy of the sources
    (CPU only: M2F_OPS_CUDA=0); skipped without a C++ toolchain, a failure under CI=true."""
    missing = toolchain.missing_toolchain()
    if missing:
        skip_or_fail_in_ci(f"the ahead-of-time build needs a C++ toolchain: {missing}")
    root = tmp_path_factory.mktemp("aot")
    project = copy_project(root / "project")
    res = setup_py(project, root / "build", env={"M2F_BUILD_OPS": "1", "M2F_OPS_CUDA": "0"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "M2F_BUILD_OPS=1: building mask2former.ops._C with CPU kernels only (M2F_OPS_CUDA=0)" in res.stdout
    built = sorted((root / "build" / "lib").rglob("*"))
    library = root / "build" / "lib" / "mask2former" / "ops" / f"_C{SUFFIX}"
    assert [p for p in built if p.is_file()] == [library], built
    assert sorted(p.name for p in (project / "mask2former" / "ops").iterdir() if p.is_file() and "_C" in p.name) == []
    return library


_CHECK_OP = r"""
import json, sys, torch
from mask2former.ops import backend_info, ms_deform_attn_reference

info = backend_info()
g = torch.Generator().manual_seed(0)
shapes = torch.tensor([[6, 4], [3, 2], [1, 1]])
starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
value = torch.randn(2, int(shapes.prod(1).sum()), 3, 5, generator=g, dtype=torch.float64)
locations = torch.rand(2, 7, 3, 3, 4, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
weights = torch.rand(2, 7, 3, 3, 4, generator=g, dtype=torch.float64)
args = (value, shapes, starts, locations, weights)
torch.testing.assert_close(torch.ops.mask2former.ms_deform_attn(*args), ms_deform_attn_reference(*args),
                           atol=1e-10, rtol=1e-10)
print(json.dumps({"build": info.build, "library": info.library, "cpu": info.cpu, "reason": info.reason}))
"""


@pytest.mark.slow
def test_aot_build_loads_and_matches_the_reference(aot_library, tmp_path):
    ext_dir = tmp_path / "torch_extensions"
    ext_dir.mkdir()
    env = dict(M2F_OPS_LIBRARY=str(aot_library), M2F_OPS="compiled", TORCH_EXTENSIONS_DIR=str(ext_dir))
    res = run_python(["-c", _CHECK_OP], **env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["build"] == aot.BUILD and out["library"] == str(aot_library) and out["cpu"], out
    assert out["reason"].startswith("ahead-of-time build (setup.py, M2F_BUILD_OPS=1)"), out
    assert list(ext_dir.iterdir()) == []  # nothing was compiled at run time

    info = run_python(["-m", "mask2former.ops", "info"], **env)
    assert info.returncode == 0, info.stderr[-3000:]
    assert f"ahead-of-time build: {aot_library}\n" in info.stdout, info.stdout
    assert "cpu backend: compiled CPU" in info.stdout and "not used" not in info.stdout
    build = run_python(["-m", "mask2former.ops", "build"], **env)
    assert build.returncode == 0, build.stderr[-3000:]
    assert build.stdout.startswith(f"nothing to build, the ahead-of-time build is loaded: {aot_library}\n")
    assert list(ext_dir.iterdir()) == []


def test_setup_without_build_ops_builds_nothing_and_imports_no_torch(tmp_path):
    project = copy_project(tmp_path / "project")
    for env in ({}, {"M2F_BUILD_OPS": "0"}):
        res = setup_py(project, tmp_path / "build", env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.splitlines()[-1] == "[]", res.stdout  # neither torch nor mask2former imported
        assert "M2F_BUILD_OPS" not in res.stdout
        assert not [p for p in tmp_path.joinpath("build").rglob("*") if p.is_file()]
    res = setup_py(project, tmp_path / "build", env={"M2F_BUILD_OPS": "yes"})
    assert res.returncode != 0 and "M2F_BUILD_OPS must be 0 or 1" in res.stderr + res.stdout


def test_extension_spec_uses_the_jit_sources_and_flags(monkeypatch):
    cflags, ldflags = sources.flags()
    monkeypatch.delenv("M2F_OPS_CUDA", raising=False)
    monkeypatch.setattr(toolchain, "visible_arch_list", lambda: "")  # no TORCH_CUDA_ARCH_LIST, no GPU
    spec = aot.extension_spec()
    assert spec.sources == sources.sources(with_cuda=False) and spec.ldflags == ldflags
    assert spec.cflags == cflags + [f"-DM2F_AOT_BUILD_ID={aot.build_id()}"]
    assert spec.arch_list is None and spec.cuda_reason is not None and "CPU kernels only" in spec.describe()

    monkeypatch.setattr(toolchain, "cuda_toolchain_missing", lambda: None)
    monkeypatch.setattr(toolchain, "cuda_home", lambda: "/opt/cuda")
    monkeypatch.setattr(toolchain, "visible_arch_list", lambda: "8.0;9.0+PTX")
    spec = aot.extension_spec()
    assert spec.sources == sources.sources(with_cuda=True) and spec.cuda_cflags == sources.CUDA_CFLAGS
    assert spec.cflags[-1] == "-DM2F_AOT_CUDA_ARCHS=8.0_9.0+PTX" and spec.cuda_home == "/opt/cuda"
    assert spec.arch_list == "8.0;9.0+PTX" and spec.cuda_reason is None

    monkeypatch.setenv("M2F_OPS_CUDA", "0")
    spec = aot.extension_spec()
    assert spec.arch_list is None and spec.cuda_reason == "M2F_OPS_CUDA=0"
    assert spec.sources == sources.sources(with_cuda=False)


def test_build_id_follows_the_sources(monkeypatch, tmp_path):
    expected = aot.build_id()
    csrc = tmp_path / "csrc"
    shutil.copytree(sources.CSRC, csrc)
    monkeypatch.setattr(sources, "CSRC", csrc)
    assert aot.build_id() == expected
    (csrc / "ms_deform_attn.h").write_text((csrc / "ms_deform_attn.h").read_text() + "\n// edited\n")
    assert aot.build_id() != expected


def test_recorded_build_is_read_without_loading(tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(marker("m2f_aot_0123456789ab", "8.0_9.0+PTX"))
    assert aot.recorded_build(lib) == ("m2f_aot_0123456789ab", "8.0;9.0+PTX")
    lib.write_bytes(marker("m2f_aot_0123456789ab"))
    assert aot.recorded_build(lib) == ("m2f_aot_0123456789ab", None)
    for content in (b"", b"\x7fELF no record"):
        lib.write_bytes(content)
        assert aot.recorded_build(lib) is None


def test_library_path(monkeypatch, tmp_path):
    monkeypatch.delenv(aot.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(aot, "OPS_DIR", tmp_path)
    with pytest.raises(aot.NotFound, match="no prebuilt library .*M2F_BUILD_OPS=1 pip install --no-build-isolation"):
        aot.library_path()
    (tmp_path / "_C.cpython-38-x86_64-linux-gnu.so").write_bytes(b"")
    with pytest.raises(aot.Unusable, match=r"_C\.cpython-38-x86_64-linux-gnu\.so\) are for another Python"):
        aot.library_path()
    (tmp_path / f"_C{SUFFIX}").write_bytes(b"")
    assert aot.library_path() == tmp_path / f"_C{SUFFIX}"
    monkeypatch.setenv(aot.LIBRARY_ENV, str(tmp_path / "elsewhere.so"))
    with pytest.raises(aot.Unusable, match="M2F_OPS_LIBRARY=.*elsewhere.so is not a file"):
        aot.library_path()
    (tmp_path / "elsewhere.so").write_bytes(b"")
    assert aot.library_path() == tmp_path / "elsewhere.so"


@pytest.mark.parametrize("content, problem", [
    (None, "records no build id"),
    ("m2f_aot_000000000000", "was built from other sources or for another torch / Python"),
    ("current", "failed"),  # the right record in a file that is no library: loading fails
])
def test_unfit_prebuilt_library_falls_back_to_jit_with_one_warning(content, problem, monkeypatch, tmp_path, capsys):
    require_compiled_cpu_ops()  # the JIT build this process falls back to (loaded, or built once)
    reset_ops_backend(monkeypatch)
    from mask2former.ops import backend_info

    lib = tmp_path / f"_C{SUFFIX}"
    lib.write_bytes(b"\x7fELF junk" if content is None else marker(aot.build_id() if content == "current" else content))
    monkeypatch.setenv(aot.LIBRARY_ENV, str(lib))
    monkeypatch.setenv("M2F_OPS", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = backend_info()
    msgs = [str(c.message) for c in caught if "mask2former.ops" in str(c.message)]
    assert len(msgs) == 1 and "not using the ahead-of-time build" in msgs[0] and problem in msgs[0], msgs
    assert info.compiled and info.build == "JIT" and problem in info.aot_reason and str(lib) in info.aot_reason
    assert ops_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"JIT build: {info.library}\n" in out and f"ahead-of-time build not used: {info.aot_reason}\n" in out

    # M2F_OPS=compiled: a prebuilt library that cannot be used is an error, not a fallback
    reset_ops_backend(monkeypatch)
    monkeypatch.setenv("M2F_OPS", "compiled")
    with pytest.raises(RuntimeError, match=f"M2F_OPS=compiled.*the ahead-of-time build cannot be used: .*{problem}"):
        backend_info()


def test_without_prebuilt_library_the_jit_build_says_why(monkeypatch, tmp_path, capsys):
    require_compiled_cpu_ops()
    reset_ops_backend(monkeypatch)
    from mask2former.ops import backend_info

    monkeypatch.delenv(aot.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(aot, "OPS_DIR", tmp_path)
    monkeypatch.setenv("M2F_OPS", "compiled")  # no prebuilt library is no error: the JIT build is the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = backend_info()
    assert info.build == "JIT" and info.aot_reason.startswith("no prebuilt library")
    assert ops_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"JIT build: {info.library}\nahead-of-time build not used: no prebuilt library" in out
