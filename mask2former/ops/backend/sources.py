"""What the library is compiled from and under which name.

``CSRC`` holds the C++/CUDA sources (package data): ``library.cpp`` declares every operator's
schema (``TORCH_LIBRARY(mask2former, ...)``), the other files register device kernels. The build
directory is named ``<prefix>_<hash>``: a hash of every file in ``csrc/`` (headers included), the
chosen sources, the compiler flags, the CUDA flags and architectures, and the torch / Python
versions, so checkouts with different sources never rebuild each other's copy.
"""
import hashlib
import sys
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["CSRC", "CPU_SOURCES", "CUDA_SOURCE", "CUDA_CFLAGS", "cuda_source_present", "sources", "flags",
           "extension_name", "load_kwargs"]

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("library.cpp", "ms_deform_attn_cpu.cpp", "frozen_bn_cpu.cpp")
# Added to the build when present and CUDA can be used (torch with CUDA, a visible GPU, nvcc).
# The file registers its own TORCH_LIBRARY_IMPL(mask2former, CUDA, ...).
CUDA_SOURCE = "ms_deform_attn_cuda.cu"
CUDA_CFLAGS = ["-O3"]


def cuda_source_present() -> bool:
    return (CSRC / CUDA_SOURCE).is_file()


def sources(with_cuda: bool = False) -> List[str]:
    """Absolute paths of the files to compile."""
    names = list(CPU_SOURCES) + ([CUDA_SOURCE] if with_cuda else [])
    return [str(CSRC / name) for name in names]


def flags():
    """(cflags, ldflags) for the C++ compiler."""
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


def extension_name(srcs, cflags, ldflags, extra=(), prefix="m2f_ops") -> str:
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


def load_kwargs(with_cuda: bool, arch_list: Optional[str] = None, prefix: str = "m2f_ops", verbose: bool = False):
    """Keyword arguments of ``cpp_extension.load`` for the CPU (+ CUDA, for ``arch_list``) build,
    its hashed ``name`` included."""
    srcs = sources(with_cuda=with_cuda)
    cflags, ldflags = flags()
    extra = (CUDA_CFLAGS, arch_list, torch.version.cuda) if with_cuda else ()
    return dict(
        name=extension_name(srcs, cflags, ldflags, extra, prefix),
        sources=srcs,
        extra_cflags=cflags,
        extra_cuda_cflags=list(CUDA_CFLAGS),
        extra_ldflags=ldflags,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
