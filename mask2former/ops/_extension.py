"""Alias of the names that lived here before the build/backend code moved to ``backend/``
(see ``backend/__init__.py`` for which module holds what). Import from the new homes; patch
names there too, since a patch of this alias does not reach the code that reads them."""
from .backend.cuda_check import CudaCheckResult, build_cuda_sources_for_check
from .backend.env import mode
from .backend.jit import BackendInfo
from .backend.sources import sources
from .backend.state import backend_info, build, compiled_available
from .backend.toolchain import cuda_home as _cuda_home  # benchmarks/bench_msdeformattn.py uses it

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
