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

CUDA: ``csrc/ms_deform_attn_cuda.cu`` joins the same library when torch has CUDA, a GPU is
visible and nvcc is found (``$CUDA_HOME``, else next to ``nvcc`` on the PATH, else
``/usr/local/cuda``). It is compiled for the compute capabilities of the visible GPUs, or for
``$TORCH_CUDA_ARCH_LIST`` when set (both part of the build's hash). If the CUDA build fails, the
library is built again without it, so the CPU kernel survives; CUDA tensors then run the
reference, with a one-time warning saying why (none when ``M2F_OPS_CUDA=0`` asked for it).
With ``M2F_OPS=compiled`` a visible GPU without a CUDA kernel is an error.
``build_cuda_sources_for_check`` compiles and links the CUDA build without a GPU (CI;
``python -m mask2former.ops build --cuda-check``).

Adding a device: put its source in ``csrc/`` with a ``TORCH_LIBRARY_IMPL(mask2former, <Key>, m)``
block; the schemas, the input checks (``csrc/ms_deform_attn.h``), the fake kernels and autograd
are shared, and ``ms_deform_attn`` routes CPU / CUDA tensors to the compiled op once a kernel is
registered for their device.
"""
import dataclasses
import hashlib
import json
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

__all__ = [
    "BackendInfo",
    "CudaCheckResult",
    "backend_info",
    "build",
    "build_cuda_sources_for_check",
    "compiled_available",
    "mode",
    "sources",
]

CSRC = Path(__file__).resolve().parent / "csrc"
_CPU_SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp", "frozen_bn_cpu.cpp")
# Added to the build when present and CUDA can be used (torch with CUDA, a visible GPU, nvcc).
# The file registers its own TORCH_LIBRARY_IMPL(mask2former, CUDA, ...).
_CUDA_SOURCE = "ms_deform_attn_cuda.cu"
_CUDA_CFLAGS = ["-O3"]
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
    cuda_reason: Optional[str] = None  # why there is no CUDA kernel (None when there is one)
    cuda_arch_list: Optional[str] = None  # TORCH_CUDA_ARCH_LIST the CUDA kernel was built for

    def describe(self, device_type: str) -> str:
        if device_type == "cpu":
            return "compiled CPU" if self.cpu else "reference"
        if device_type == "cuda":
            return "compiled CUDA" if self.cuda else "reference"
        return "reference"


_lock = threading.Lock()
_info: Optional[BackendInfo] = None
_warned = False
_warned_cuda = False


def mode() -> str:
    """The value of ``M2F_OPS`` (auto / reference / compiled)."""
    value = os.environ.get("M2F_OPS", "").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"M2F_OPS must be one of {', '.join(_MODES)}; got {value!r}")
    return value


def _cuda_opted_out() -> bool:
    return os.environ.get("M2F_OPS_CUDA", "1").strip() == "0"


def _cuda_home() -> Optional[str]:
    """A CUDA toolkit root with both ``bin/nvcc`` and ``include/cuda_runtime.h``, or None.

    cpp_extension guesses ``CUDA_HOME`` from the ``nvcc`` on the PATH; a wrapper script such as
    ``/usr/local/bin/nvcc`` makes that guess ``/usr/local``, which has no CUDA headers, so the
    usual locations are tried as well."""
    cpp_extension = _import_cpp_extension()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(Path(home))
    return None


def _cuda_toolchain_missing() -> Optional[str]:
    """None when CUDA sources can be compiled here (GPU or not), else the reason."""
    if not (CSRC / _CUDA_SOURCE).is_file():
        return "no CUDA kernel source in this version"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if _cuda_home() is None:
        return "nvcc / CUDA headers not found (set CUDA_HOME)"
    return None


def _want_cuda() -> Optional[str]:
    """None when the CUDA source should be built, else the reason it is not."""
    if not (CSRC / _CUDA_SOURCE).is_file():
        return "no CUDA kernel source in this version"
    if _cuda_opted_out():
        return "M2F_OPS_CUDA=0"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return _cuda_toolchain_missing()


def _visible_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST`` if set, else the compute capabilities of the visible GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def sources(with_cuda: bool = False) -> List[str]:
    names = list(_CPU_SOURCES) + ([_CUDA_SOURCE] if with_cuda else [])
    return [str(CSRC / name) for name in names]


def _flags():
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    # No -march=native: the build must run on any CPU of the architecture. The CPU kernels pick
    # an AVX2 / AVX-512 variant at run time themselves (see csrc/cpu_isa.h).
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


def _extension_name(srcs, cflags, ldflags, extra=(), prefix="m2f_ops") -> str:
    """Name of the build: a hash of everything in csrc/ (headers included), the chosen sources,
    the flags, ``extra`` (CUDA flags and architectures) and the torch / Python versions."""
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.iterdir() if p.is_file()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(repr(([Path(s).name for s in srcs], cflags, ldflags, torch.__version__, sys.version_info[:2])).encode())
    if extra:
        h.update(repr(tuple(extra)).encode())
    return f"{prefix}_{h.hexdigest()[:12]}"


def _missing_toolchain() -> Optional[str]:
    cpp_extension = _import_cpp_extension()

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


class _CudaBuildEnv:
    """Points cpp_extension at a usable CUDA toolkit and sets TORCH_CUDA_ARCH_LIST for one build
    (both are restored afterwards; callers hold ``_lock``)."""

    def __init__(self, home: str, arch_list: str):
        self.home, self.arch_list = home, arch_list

    def __enter__(self):
        self.cpp_extension = _import_cpp_extension()
        self.saved_home = self.cpp_extension.CUDA_HOME
        self.saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        self.cpp_extension.CUDA_HOME = self.home
        os.environ["TORCH_CUDA_ARCH_LIST"] = self.arch_list
        return self

    def __exit__(self, *exc):
        self.cpp_extension.CUDA_HOME = self.saved_home
        if self.saved_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = self.saved_arch
        return False


def _compile_and_load(with_cuda: bool, verbose: bool):
    """cpp_extension.load of the CPU (+ CUDA) sources; returns (library path, seconds, arch list)."""
    cpp_extension = _import_cpp_extension()
    srcs = sources(with_cuda=with_cuda)
    cflags, ldflags = _flags()
    arch_list = _visible_arch_list() if with_cuda else None
    extra = (_CUDA_CFLAGS, arch_list, torch.version.cuda) if with_cuda else ()
    name = _extension_name(srcs, cflags, ldflags, extra)
    kwargs = dict(
        name=name,
        sources=srcs,
        extra_cflags=cflags,
        extra_cuda_cflags=list(_CUDA_CFLAGS),
        extra_ldflags=ldflags,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    t0 = time.perf_counter()
    try:
        if with_cuda:
            with _CudaBuildEnv(_cuda_home(), arch_list):
                library = cpp_extension.load(**kwargs)
        else:
            library = cpp_extension.load(**kwargs)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
        raise _BuildError(f"compilation failed: {_compiler_errors(exc)}") from exc
    return library, time.perf_counter() - t0, arch_list


def _load(verbose: bool) -> BackendInfo:
    if mode() == "reference":
        return BackendInfo(False, False, False, "M2F_OPS=reference", cuda_reason="M2F_OPS=reference")
    missing = _missing_toolchain()
    if missing is not None:
        raise _BuildError(missing)
    cuda_skip = _want_cuda()
    gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
    if cuda_skip is not None and gpu_visible and not _cuda_opted_out() and mode() == "compiled":
        raise _BuildError(f"a CUDA device is visible but the CUDA kernel cannot be built: {cuda_skip}")
    library = seconds = arch_list = None
    if cuda_skip is None:
        try:
            library, seconds, arch_list = _compile_and_load(True, verbose)
        except _BuildError as exc:
            if mode() == "compiled":
                raise
            # Keep the CPU kernel: build again without the CUDA source.
            cuda_skip = f"CUDA build failed: {exc}"
    if library is None:
        library, seconds, _ = _compile_and_load(False, verbose)
    from . import _registration

    _registration.ensure_registered()
    cpu, cuda = _kernel_registered("CPU"), _kernel_registered("CUDA")
    reason = "built from csrc/"
    cuda_reason = None
    if not cuda:
        cuda_reason = cuda_skip or "CUDA kernel not registered"
        reason += f"; CUDA kernel not built ({cuda_reason})"
    else:
        reason += f"; CUDA kernel for TORCH_CUDA_ARCH_LIST={arch_list}"
    return BackendInfo(True, cpu, cuda, reason, str(library), seconds, cuda_reason, arch_list if cuda else None)


class _BuildError(Exception):
    pass


def _first_lines(exc: BaseException, n: int = 6) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def _compiler_errors(exc: BaseException, n: int = 6) -> str:
    """The compiler's error lines from a failed cpp_extension build (its message embeds the
    whole ninja log, command lines included), else the first lines of the message."""
    text = str(exc)
    picked = []
    for line in text.splitlines():
        low = line.lower()
        if ("error" in low or "fatal" in low) and len(line) < 400 and not low.startswith("error building extension"):
            picked.append(line.strip())
    if not picked:
        return _first_lines(exc, n)
    head = text.splitlines()[0].split(":")[0]  # "Error building extension 'name'"
    return head + ": " + "\n".join(picked[:n]) + ("\n..." if len(picked) > n else "")


def _warn_once(kind: str, message: str, stacklevel: int) -> None:
    """One RuntimeWarning per process and kind ("build": no compiled kernels at all, "cuda":
    CUDA tensors run the reference)."""
    global _warned, _warned_cuda
    if kind == "build":
        if _warned:
            return
        _warned = True
    else:
        if _warned_cuda or _warned:  # the build warning already said everything runs the reference
            return
        _warned_cuda = True
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def backend_info(build: bool = True, verbose: bool = False) -> BackendInfo:
    """Load the compiled operators (building them if needed) and say which backend is active.

    With ``M2F_OPS=compiled`` a build failure raises RuntimeError; otherwise it warns once
    and reports the reference backend. ``build=False`` only reports the current state.
    """
    global _info
    if _info is not None:
        return _info
    if not build:
        return BackendInfo(False, False, False, "not loaded yet", cuda_reason="not loaded yet")
    with _lock:
        if _info is None:
            try:
                _info = _load(verbose)
            except _BuildError as exc:
                if mode() == "compiled":
                    raise RuntimeError(f"M2F_OPS=compiled but the ms_deform_attn kernels are unavailable: {exc}") from (
                        exc.__cause__ or exc
                    )
                _info = BackendInfo(False, False, False, str(exc), cuda_reason=str(exc))
                _warn_once(
                    "build",
                    f"mask2former.ops: using the PyTorch reference for ms_deform_attn ({exc}). "
                    "Set M2F_OPS=reference to silence this, or see `python -m mask2former.ops info`.",
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
    traced graph and the choice costs nothing at run time. The first CUDA tensor that has to
    run the reference although the kernels were built (no nvcc, CUDA build failed, ...) warns
    once, unless ``M2F_OPS_CUDA=0`` asked for that.
    """
    if mode() == "reference":
        return False
    info = backend_info()
    if device_type == "cpu":
        return info.cpu
    if device_type == "cuda":
        if not info.cuda and info.compiled and not _cuda_opted_out():
            _warn_once(
                "cuda",
                f"mask2former.ops: CUDA tensors use the PyTorch reference for ms_deform_attn "
                f"({info.cuda_reason}). Set M2F_OPS_CUDA=0 to silence this, or see "
                "`python -m mask2former.ops info`.",
                stacklevel=3,
            )
        return info.cuda
    return False


# ------------------------------------------------------------------------ CUDA build check (CI)
@dataclasses.dataclass(frozen=True)
class CudaCheckResult:
    """Outcome of ``build_cuda_sources_for_check``."""

    library: str  # the linked shared library
    arch_list: str  # TORCH_CUDA_ARCH_LIST it was compiled for
    seconds: float  # wall time of the build (a cached build takes ~1 s)
    loaded: bool  # whether the library could also be loaded (needs no GPU, but needs the CUDA runtime)
    cuda_kernel_registered: bool  # loaded and mask2former::ms_deform_attn has a CUDA kernel
    load_error: Optional[str] = None


_CHECK_SCRIPT = r"""
import json, logging, sys
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import torch
from torch.utils import cpp_extension
kwargs = json.loads(sys.argv[1])
out = {"loaded": False, "registered": False, "error": None}
try:
    cpp_extension.load(**kwargs)
    out["loaded"] = True
    out["registered"] = torch._C._dispatch_has_kernel_for_dispatch_key("mask2former::ms_deform_attn", "CUDA")
except Exception as exc:  # the build itself failed, or only loading the result did
    out["error"] = f"{type(exc).__name__}: {exc}"
print("M2F_CHECK_RESULT " + json.dumps(out))
"""


def build_cuda_sources_for_check(
    arch_list: str = "8.0;9.0", build_dir=None, verbose: bool = False, timeout: Optional[float] = None
) -> CudaCheckResult:
    """Compile and link the CUDA build of the extension (all of ``csrc/``, CUDA source included)
    for ``arch_list``, without needing a GPU: a CI check that the kernels compile.

    The build runs ``cpp_extension.load(with_cuda=True)`` in a child Python process with
    ``TORCH_CUDA_ARCH_LIST=arch_list``: loading the library registers the ``mask2former``
    operator namespace, which must not happen twice in this process (nor replace the library
    the process uses). The child then tries to load the result; without a GPU that usually
    still works (only the CUDA runtime library is needed), but only compilation and linking
    are required to succeed. ``build_dir`` defaults to a directory named after the hash of the
    sources, flags and ``arch_list`` in the torch extensions dir, so a repeated check is a
    no-op. Raises RuntimeError when the toolchain is missing or the build fails.
    """
    cpp_extension = _import_cpp_extension()
    missing = _missing_toolchain() or _cuda_toolchain_missing()
    if missing is not None:
        raise RuntimeError(f"cannot compile the CUDA sources: {missing}")
    home = _cuda_home()
    srcs = sources(with_cuda=True)
    cflags, ldflags = _flags()
    name = _extension_name(srcs, cflags, ldflags, (_CUDA_CFLAGS, arch_list, torch.version.cuda), "m2f_ops_cudacheck")
    if build_dir is None:  # where cpp_extension.load would put it
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
            cpp_extension.get_default_build_root(),
            f"py{sys.version_info[0]}{sys.version_info[1]}_cu{torch.version.cuda.replace('.', '')}",
        )
        build_dir = Path(root) / name
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        name=name,
        sources=srcs,
        extra_cflags=cflags,
        extra_cuda_cflags=list(_CUDA_CFLAGS),
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        with_cuda=True,
        is_python_module=False,
        verbose=verbose,
    )
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch_list, "CUDA_HOME": home}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", _CHECK_SCRIPT, json.dumps(kwargs)],
        env=env,
        capture_output=not verbose,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - t0
    stdout = res.stdout or ""
    marker = [line for line in stdout.splitlines() if line.startswith("M2F_CHECK_RESULT ")]
    out = json.loads(marker[-1].split(" ", 1)[1]) if marker else None
    library = build_dir / f"{name}.so"
    if sys.platform == "win32":
        library = build_dir / f"{name}.pyd"
    if not library.is_file() or (out is None and res.returncode != 0):
        detail = out["error"] if out and out["error"] else ((res.stderr or "") + stdout).strip() or f"exit {res.returncode}"
        summary = _compiler_errors(RuntimeError(detail), 20) if "error" in detail.lower() else _tail(detail)
        raise RuntimeError(f"building the CUDA sources failed (TORCH_CUDA_ARCH_LIST={arch_list}): {summary}")
    if out is None:
        out = {"loaded": False, "registered": False, "error": "no result from the build process"}
    return CudaCheckResult(str(library), arch_list, seconds, out["loaded"], out["registered"], out["error"])


def _tail(text: str, n: int = 30) -> str:
    lines = text.splitlines()
    return "\n".join(lines[-n:])
