"""Compile and load the library with ``torch.utils.cpp_extension.load`` (ninja) into the torch
extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/<py>_<cu>/``),
under the hashed name from ``sources``. cpp_extension holds a file lock in the build directory
while building, so concurrent processes (pytest-xdist workers) build once and the others wait
and load the result.

CUDA: ``csrc/ms_deform_attn_cuda.cu`` joins the library when torch has CUDA, a GPU is visible,
nvcc is found and ``M2F_OPS_CUDA`` is not 0 (``want_cuda``). It is compiled for the visible
GPUs' compute capabilities or ``$TORCH_CUDA_ARCH_LIST``. If that build fails, the library is
built again without it so the CPU kernel survives (``M2F_OPS=compiled`` makes it an error).
``load`` returns a ``BackendInfo`` saying which kernels got registered and why.
"""
import dataclasses
import subprocess
import time
from typing import Optional

import torch

from . import env, sources, toolchain

__all__ = ["BUILD", "PROBE_OP", "BackendInfo", "cuda_unusable", "want_cuda", "kernel_registered", "compile_and_load",
           "loaded_info", "load"]

# The operator whose registered kernels tell which devices the library covers.
PROBE_OP = "mask2former::ms_deform_attn"
BUILD = "JIT"  # BackendInfo.build of a library built (or found cached) by this module


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
    build: Optional[str] = None  # how the library got here: "JIT" or "ahead-of-time" (backend/aot.py)
    aot_reason: Optional[str] = None  # why no ahead-of-time build was loaded (None when one was)

    def describe(self, device_type: str) -> str:
        if device_type == "cpu":
            return "compiled CPU" if self.cpu else "reference"
        if device_type == "cuda":
            return "compiled CUDA" if self.cuda else "reference"
        return "reference"


def cuda_unusable() -> Optional[str]:
    """None when a CUDA kernel can be used here (``M2F_OPS_CUDA`` not 0, torch with CUDA, a
    visible GPU), else the reason it cannot."""
    if env.cuda_opted_out():
        return "M2F_OPS_CUDA=0"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def want_cuda() -> Optional[str]:
    """None when the CUDA source should be built, else the reason it is not."""
    if not sources.cuda_source_present():
        return "no CUDA kernel source in this version"
    return cuda_unusable() or toolchain.cuda_toolchain_missing()


def kernel_registered(key: str) -> bool:
    """Whether the loaded library has a kernel for dispatch key ``key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(PROBE_OP, key)


def compile_and_load(with_cuda: bool, verbose: bool):
    """cpp_extension.load of the CPU (+ CUDA) sources; returns (library path, seconds, arch list)."""
    cpp_extension = toolchain.import_cpp_extension()
    arch_list = toolchain.visible_arch_list() if with_cuda else None
    kwargs = sources.load_kwargs(with_cuda, arch_list, verbose=verbose)
    t0 = time.perf_counter()
    try:
        if with_cuda:
            with toolchain.CudaBuildEnv(toolchain.cuda_home(), arch_list):
                library = cpp_extension.load(**kwargs)
        else:
            library = cpp_extension.load(**kwargs)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
        raise toolchain.BuildError(f"compilation failed: {toolchain.compiler_errors(exc)}") from exc
    return library, time.perf_counter() - t0, arch_list


def load(verbose: bool) -> BackendInfo:
    """Build (or find the cached build of) the library and load it into this process.

    Raises ``toolchain.BuildError`` when that is impossible (no compiler, failed build, or with
    ``M2F_OPS=compiled`` a visible GPU without a CUDA kernel)."""
    mode = env.mode()
    if mode == "reference":
        return BackendInfo(False, False, False, "M2F_OPS=reference", cuda_reason="M2F_OPS=reference")
    missing = toolchain.missing_toolchain()
    if missing is not None:
        raise toolchain.BuildError(missing)
    cuda_skip = want_cuda()
    gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
    if cuda_skip is not None and gpu_visible and not env.cuda_opted_out() and mode == "compiled":
        raise toolchain.BuildError(f"a CUDA device is visible but the CUDA kernel cannot be built: {cuda_skip}")
    library = seconds = arch_list = None
    if cuda_skip is None:
        try:
            library, seconds, arch_list = compile_and_load(True, verbose)
        except toolchain.BuildError as exc:
            if mode == "compiled":
                raise
            # Keep the CPU kernel: build again without the CUDA source.
            cuda_skip = f"CUDA build failed: {exc}"
    if library is None:
        library, seconds, _ = compile_and_load(False, verbose)
    return loaded_info("built from csrc/", library, seconds, cuda_skip, arch_list, BUILD)


def loaded_info(reason: str, library, seconds, cuda_skip: Optional[str], arch_list: Optional[str],
                build: str) -> BackendInfo:
    """The BackendInfo of a loaded library: which kernels it registered, ``reason`` completed by
    the CUDA kernel's architectures or why there is none (``cuda_skip``)."""
    cpu, cuda = kernel_registered("CPU"), kernel_registered("CUDA")
    cuda_reason = None
    if not cuda:
        cuda_reason = cuda_skip or "CUDA kernel not registered"
        reason += f"; CUDA kernel not built ({cuda_reason})"
    else:
        reason += f"; CUDA kernel for TORCH_CUDA_ARCH_LIST={arch_list}"
    return BackendInfo(True, cpu, cuda, reason, str(library), seconds, cuda_reason, arch_list if cuda else None,
                       build)
