"""Build, load and report the compiled ``mask2former::`` operators.

The C++ sources in ``csrc/`` ship as package data and are compiled on first use with
``torch.utils.cpp_extension.load`` (ninja), into the torch extensions directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/<py>_<cu>/``). The build
directory's name carries a hash of the sources, the flags and the torch version, so checkouts
with different sources never rebuild each other's copy; cpp_extension holds a file lock in
that directory while building, so concurrent processes (pytest-xdist workers) build once and
the others wait and load the result. ``pip install`` needs neither torch nor a compiler.

Backend selection, environment variable ``M2F_OPS``:
    auto (default)  use the compiled kernels; if they cannot be built, warn once and use the
                    PyTorch reference
    reference       always use the reference; never build
    compiled        the compiled kernels are required: failing to build is an error
Further knobs: ``M2F_OPS_CPU_ISA=generic|avx2|avx512`` caps the instruction set the CPU kernel
uses (read on every call); ``M2F_OPS_CUDA=0`` leaves the CUDA kernel out of the build.

Adding a device: put its source in ``csrc/`` (``ms_deform_attn_cuda.cu`` is picked up below when
CUDA is usable) with a ``TORCH_LIBRARY_IMPL(mask2former, <Key>, m)`` block; the schemas, the
input checks (``csrc/ms_deform_attn.h``), the fake kernels and autograd are shared, and
``ms_deform_attn`` routes CPU / CUDA tensors to the compiled op once a kernel is registered
for their device.
"""
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["BackendInfo", "backend_info", "build", "compiled_available", "mode", "sources"]

CSRC = Path(__file__).resolve().parent / "csrc"
_CPU_SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp")
# Added to the build when present and CUDA can be used (torch with CUDA, a visible GPU, nvcc).
# The file registers its own TORCH_LIBRARY_IMPL(mask2former, CUDA, ...).
_CUDA_SOURCE = "ms_deform_attn_cuda.cu"
_MODES = ("auto", "reference", "compiled")


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Which implementation ``ms_deform_attn`` runs, and why."""

    compiled: bool  # the C++ library is loaded
    cpu: bool  # a compiled CPU kernel is registered
    cuda: bool  # a compiled CUDA kernel is registered
    reason: str  # human-readable explanation
    library: Optional[str] = None  # path of the loaded shared library
    build_seconds: Optional[float] = None  # time spent in cpp_extension.load (build or no-op check)

    def describe(self, device_type: str) -> str:
        if device_type == "cpu":
            return "compiled CPU" if self.cpu else "reference"
        if device_type == "cuda":
            return "compiled CUDA" if self.cuda else "reference"
        return "reference"


_lock = threading.Lock()
_info: Optional[BackendInfo] = None
_warned = False


def mode() -> str:
    """The value of ``M2F_OPS`` (auto / reference / compiled)."""
    value = os.environ.get("M2F_OPS", "").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"M2F_OPS must be one of {', '.join(_MODES)}; got {value!r}")
    return value


def _want_cuda() -> Optional[str]:
    """None when the CUDA source should be built, else the reason it is not."""
    if not (CSRC / _CUDA_SOURCE).is_file():
        return "no CUDA kernel source in this version"
    if os.environ.get("M2F_OPS_CUDA", "1") == "0":
        return "M2F_OPS_CUDA=0"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME)"
    return None


def sources(with_cuda: bool = False) -> List[str]:
    names = list(_CPU_SOURCES) + ([_CUDA_SOURCE] if with_cuda else [])
    return [str(CSRC / name) for name in names]


def _flags():
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    # No -march=native: the build must run on any CPU of the architecture. The CPU kernels pick
    # an AVX2 / AVX-512 variant at run time themselves (see csrc/ms_deform_attn_cpu.cpp).
    cflags = ["-O3"]
    ldflags = []
    # at::parallel_for is an inline OpenMP loop when torch uses OpenMP (Linux wheels); without
    # -fopenmp it would run serially. libgomp.so.1 is the one torch already loaded.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    else:
        cflags.append("-fopenmp-simd")  # still honour `#pragma omp simd`
    return cflags, ldflags


def _extension_name(srcs, cflags, ldflags) -> str:
    """Name of the build: a hash of everything in csrc/ (headers included), the chosen sources,
    the flags and the torch / Python versions."""
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.iterdir() if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(repr(([Path(s).name for s in srcs], cflags, ldflags, torch.__version__, sys.version_info[:2])).encode())
    return f"m2f_ops_{h.hexdigest()[:12]}"


def _missing_toolchain() -> Optional[str]:
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler() if hasattr(cpp_extension, "get_cxx_compiler") else "c++"
    if shutil.which(compiler) is None:
        return f"C++ compiler not found ({compiler!r}; set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def _import_cpp_extension():
    # Importing cpp_extension logs a warning when CUDA_HOME exists but no GPU does; that is
    # irrelevant here (CUDA is only built when a GPU is visible), so keep it quiet.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _kernel_registered(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("mask2former::ms_deform_attn", key)


def _load(verbose: bool) -> BackendInfo:
    if mode() == "reference":
        return BackendInfo(False, False, False, "M2F_OPS=reference")
    cpp_extension = _import_cpp_extension()
    missing = _missing_toolchain()
    if missing is not None:
        raise _BuildError(missing)
    cuda_skip = _want_cuda()
    srcs = sources(with_cuda=cuda_skip is None)
    cflags, ldflags = _flags()
    name = _extension_name(srcs, cflags, ldflags)
    t0 = time.perf_counter()
    try:
        library = cpp_extension.load(
            name=name,
            sources=srcs,
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3"],
            extra_ldflags=ldflags,
            with_cuda=cuda_skip is None,
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
        raise _BuildError(f"compilation failed: {_first_lines(exc)}") from exc
    seconds = time.perf_counter() - t0
    from . import _registration

    _registration.ensure_registered()
    cpu, cuda = _kernel_registered("CPU"), _kernel_registered("CUDA")
    reason = "built from csrc/"
    if not cuda:
        reason += f"; CUDA kernel not built ({cuda_skip or 'not registered'})"
    return BackendInfo(True, cpu, cuda, reason, str(library), seconds)


class _BuildError(Exception):
    pass


def _first_lines(exc: BaseException, n: int = 6) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def backend_info(build: bool = True, verbose: bool = False) -> BackendInfo:
    """Load the compiled operators (building them if needed) and say which backend is active.

    With ``M2F_OPS=compiled`` a build failure raises RuntimeError; otherwise it warns once
    and reports the reference backend. ``build=False`` only reports the current state.
    """
    global _info, _warned
    if _info is not None:
        return _info
    if not build:
        return BackendInfo(False, False, False, "not loaded yet")
    with _lock:
        if _info is None:
            try:
                _info = _load(verbose)
            except _BuildError as exc:
                if mode() == "compiled":
                    raise RuntimeError(f"M2F_OPS=compiled but the ms_deform_attn kernels are unavailable: {exc}") from (
                        exc.__cause__ or exc
                    )
                _info = BackendInfo(False, False, False, str(exc))
                if not _warned:
                    _warned = True
                    warnings.warn(
                        f"mask2former.ops: using the PyTorch reference for ms_deform_attn ({exc}). "
                        "Set M2F_OPS=reference to silence this, or see `python -m mask2former.ops info`.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _info


def build(verbose: bool = False) -> BackendInfo:
    """Build (or load the cached build of) the kernels; raise RuntimeError if that fails."""
    global _info
    if mode() == "reference":
        raise RuntimeError("M2F_OPS=reference: not building the compiled kernels")
    with _lock:
        if _info is None or not _info.compiled:
            try:
                _info = _load(verbose)
            except _BuildError as exc:
                raise RuntimeError(f"building the ms_deform_attn kernels failed: {exc}") from (exc.__cause__ or exc)
    return _info


@torch.compiler.assume_constant_result
def compiled_available(device_type: str) -> bool:
    """Whether the compiled op handles tensors of this device type.

    Treated as a constant by torch.compile, so the (one-time) build never happens inside a
    traced graph and the choice costs nothing at run time.
    """
    if mode() == "reference":
        return False
    info = backend_info()
    return info.cpu if device_type == "cpu" else info.cuda if device_type == "cuda" else False
