"""The tools a build needs and what they say when it fails.

* ``missing_toolchain``: the C++ compiler (``$CXX``, else ``c++``) and ninja;
* ``cuda_home`` / ``cuda_toolchain_missing``: a CUDA toolkit with ``bin/nvcc`` and
  ``include/cuda_runtime.h`` (``$CUDA_HOME``, ``$CUDA_PATH``, next to ``nvcc`` on the PATH,
  ``/usr/local/cuda``) and a torch built with CUDA;
* ``visible_arch_list`` / ``CudaBuildEnv``: ``$TORCH_CUDA_ARCH_LIST`` or the visible GPUs'
  compute capabilities, set (with CUDA_HOME) for the duration of one build;
* ``BuildError`` and ``compiler_errors`` / ``tail``: short messages from cpp_extension's output.
"""
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import sources

__all__ = [
    "BuildError",
    "CudaBuildEnv",
    "compiler_errors",
    "cuda_home",
    "cuda_toolchain_missing",
    "import_cpp_extension",
    "missing_toolchain",
    "tail",
    "visible_arch_list",
]


class BuildError(Exception):
    """The library cannot be built here, or building it failed; the message says why."""


def import_cpp_extension():
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


def missing_toolchain() -> Optional[str]:
    """None when C++ sources can be built here, else the reason."""
    cpp_extension = import_cpp_extension()

    compiler = cpp_extension.get_cxx_compiler() if hasattr(cpp_extension, "get_cxx_compiler") else "c++"
    if shutil.which(compiler) is None:
        return f"C++ compiler not found ({compiler!r}; set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def cuda_home() -> Optional[str]:
    """A CUDA toolkit root with both ``bin/nvcc`` and ``include/cuda_runtime.h``, or None.

    cpp_extension guesses ``CUDA_HOME`` from the ``nvcc`` on the PATH; a wrapper script such as
    ``/usr/local/bin/nvcc`` makes that guess ``/usr/local``, which has no CUDA headers, so the
    usual locations are tried as well."""
    cpp_extension = import_cpp_extension()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(Path(home))
    return None


def cuda_toolchain_missing() -> Optional[str]:
    """None when CUDA sources can be compiled here (GPU or not), else the reason."""
    if not sources.cuda_source_present():
        return "no CUDA kernel source in this version"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if cuda_home() is None:
        return "nvcc / CUDA headers not found (set CUDA_HOME)"
    return None


def visible_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST`` if set, else the compute capabilities of the visible GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


class CudaBuildEnv:
    """Points cpp_extension at a usable CUDA toolkit and sets TORCH_CUDA_ARCH_LIST for one build
    (both are restored afterwards; callers hold the backend's lock)."""

    def __init__(self, home: str, arch_list: str):
        self.home, self.arch_list = home, arch_list

    def __enter__(self):
        self.cpp_extension = import_cpp_extension()
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


def _first_lines(exc: BaseException, n: int = 6) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def compiler_errors(exc: BaseException, n: int = 6) -> str:
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


def tail(text: str, n: int = 30) -> str:
    """The last ``n`` lines of ``text``."""
    lines = text.splitlines()
    return "\n".join(lines[-n:])
