"""CI check that the CUDA build compiles and links, without a GPU
(``python -m mask2former.ops build --cuda-check``).

``build_cuda_sources_for_check`` runs the build in a child process (``cuda_check_child.py``)
and returns a ``CudaCheckResult``; it never changes the library this process uses.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import cuda_check_child, jit, sources, toolchain

__all__ = ["CudaCheckResult", "build_cuda_sources_for_check"]


@dataclasses.dataclass(frozen=True)
class CudaCheckResult:
    """Outcome of ``build_cuda_sources_for_check``."""

    library: str  # the linked shared library
    arch_list: str  # TORCH_CUDA_ARCH_LIST it was compiled for
    seconds: float  # wall time of the build (a cached build takes ~1 s)
    loaded: bool  # whether the library could also be loaded (needs no GPU, but needs the CUDA runtime)
    cuda_kernel_registered: bool  # loaded and mask2former::ms_deform_attn has a CUDA kernel
    load_error: Optional[str] = None


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
    cpp_extension = toolchain.import_cpp_extension()
    missing = toolchain.missing_toolchain() or toolchain.cuda_toolchain_missing()
    if missing is not None:
        raise RuntimeError(f"cannot compile the CUDA sources: {missing}")
    home = toolchain.cuda_home()
    kwargs = sources.load_kwargs(True, arch_list, prefix="m2f_ops_cudacheck", verbose=verbose)
    name = kwargs["name"]
    if build_dir is None:  # where cpp_extension.load would put it
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
            cpp_extension.get_default_build_root(),
            f"py{sys.version_info[0]}{sys.version_info[1]}_cu{torch.version.cuda.replace('.', '')}",
        )
        build_dir = Path(root) / name
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs["build_directory"] = str(build_dir)
    child_env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch_list, "CUDA_HOME": home}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, cuda_check_child.__file__, json.dumps(kwargs), jit.PROBE_OP],
        env=child_env,
        capture_output=not verbose,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - t0
    stdout = res.stdout or ""
    marker = [line for line in stdout.splitlines() if line.startswith(cuda_check_child.MARKER)]
    out = json.loads(marker[-1][len(cuda_check_child.MARKER):]) if marker else None
    library = build_dir / f"{name}.so"
    if sys.platform == "win32":
        library = build_dir / f"{name}.pyd"
    if not library.is_file() or (out is None and res.returncode != 0):
        detail = out["error"] if out and out["error"] else ((res.stderr or "") + stdout).strip() or f"exit {res.returncode}"
        summary = toolchain.compiler_errors(RuntimeError(detail), 20) if "error" in detail.lower() else toolchain.tail(detail)
        raise RuntimeError(f"building the CUDA sources failed (TORCH_CUDA_ARCH_LIST={arch_list}): {summary}")
    if out is None:
        out = {"loaded": False, "registered": False, "error": "no result from the build process"}
    return CudaCheckResult(str(library), arch_list, seconds, out["loaded"], out["registered"], out["error"])
