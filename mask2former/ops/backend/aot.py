"""The ahead-of-time build of the library: what ``setup.py`` compiles under ``M2F_BUILD_OPS=1``,
and how the backend finds, checks and loads the result instead of building it on first use.

Build: ``extension_spec()`` gives the sources and flags of ``sources.py`` (those of the JIT build)
plus ``-DM2F_AOT_BUILD_ID=<build_id()>``, and the CUDA source when torch has CUDA, nvcc is found,
``$TORCH_CUDA_ARCH_LIST`` or a visible GPU gives the architectures and ``M2F_OPS_CUDA`` is not 0
(then also ``-DM2F_AOT_CUDA_ARCHS=<archs, ';' written as '_'>``). ``setup.py`` loads this package
by path, without importing ``mask2former``. The result is the extension ``EXTENSION``, i.e.
``mask2former/ops/_C<EXT_SUFFIX>``: a plain shared library of torch operators (no Python module
init), loaded with ``torch.ops.load_library``.

Load: ``library_path()`` is ``$M2F_OPS_LIBRARY`` when set, else ``_C<EXT_SUFFIX>`` next to the ops
package. ``csrc/library.cpp`` compiles the two defines into the string
``m2f_aot_build_id=<id>;cuda_archs=<archs|none>;``, which ``recorded_build()`` reads from the file
without loading it. ``load()`` loads the library only when that id equals this checkout's
``build_id()`` (a hash of ``csrc/``, the flags and the torch / Python versions): a library built
from other sources or for another torch is never loaded, because its ``TORCH_LIBRARY`` would
take the operator namespace that the JIT build needs as fallback. It raises ``NotFound`` when
there is no prebuilt library (the JIT build is the default) and ``Unusable`` when there is one
that cannot be used; ``state`` decides what follows (fallback, or an error under
``M2F_OPS=compiled``).
"""
import dataclasses
import importlib.machinery
import mmap
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import env, jit, sources, toolchain
from .jit import BackendInfo

__all__ = ["BUILD", "EXTENSION", "LIBRARY_ENV", "ExtensionSpec", "NotFound", "Unusable", "build_id", "extension_spec",
           "library_path", "recorded_build", "load"]

BUILD = "ahead-of-time"  # BackendInfo.build of a library loaded by this module
EXTENSION = "mask2former.ops._C"
LIBRARY_ENV = "M2F_OPS_LIBRARY"
OPS_DIR = sources.CSRC.parent
_MARKER = b"m2f_aot_build_id="
INSTALL_HINT = "M2F_BUILD_OPS=1 pip install --no-build-isolation -e ."


class NotFound(Exception):
    """There is no prebuilt library; the message says where it was looked for."""


class Unusable(Exception):
    """A prebuilt library is there but cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class ExtensionSpec:
    """What ``setup.py`` compiles into ``EXTENSION``."""

    sources: List[str]  # absolute paths
    cflags: List[str]  # C++ flags, the build id define included
    cuda_cflags: List[str]
    ldflags: List[str]
    arch_list: Optional[str]  # TORCH_CUDA_ARCH_LIST of the CUDA kernel; None: CPU only
    cuda_home: Optional[str]
    cuda_reason: Optional[str]  # why the CUDA kernel is left out (None when it is built)

    def describe(self) -> str:
        if self.arch_list:
            return f"CPU + CUDA kernels (TORCH_CUDA_ARCH_LIST={self.arch_list}, CUDA_HOME={self.cuda_home})"
        return f"CPU kernels only ({self.cuda_reason})"


def build_id() -> str:
    """The id an ahead-of-time build records and the loader expects: a hash of every file in
    ``csrc/``, the CPU sources, the C++ flags and the torch / Python versions."""
    return sources.extension_name(sources.sources(with_cuda=False), *sources.flags(), prefix="m2f_aot")


def _cuda_plan() -> Tuple[Optional[str], Optional[str]]:
    """(arch list, None) when the CUDA kernel joins the ahead-of-time build, else (None, reason).
    Unlike the JIT build no GPU is needed: ``$TORCH_CUDA_ARCH_LIST`` names the architectures."""
    if env.cuda_opted_out():
        return None, "M2F_OPS_CUDA=0"
    missing = toolchain.cuda_toolchain_missing()
    if missing is not None:
        return None, missing
    arch_list = toolchain.visible_arch_list()
    if not arch_list:
        return None, "no CUDA architecture: set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') or build where a GPU is visible"
    return arch_list, None


def extension_spec() -> ExtensionSpec:
    """The sources and flags of the ahead-of-time build in this environment."""
    arch_list, cuda_reason = _cuda_plan()
    cflags, ldflags = sources.flags()
    defines = [f"-DM2F_AOT_BUILD_ID={build_id()}"]
    if arch_list:
        # A define's value cannot carry ';' through ninja's shell; the loader maps '_' back.
        defines.append(f"-DM2F_AOT_CUDA_ARCHS={'_'.join(arch_list.replace(';', ' ').split())}")
    return ExtensionSpec(
        sources=sources.sources(with_cuda=arch_list is not None),
        cflags=cflags + defines,
        cuda_cflags=list(sources.CUDA_CFLAGS),
        ldflags=ldflags,
        arch_list=arch_list,
        cuda_home=toolchain.cuda_home() if arch_list else None,
        cuda_reason=cuda_reason,
    )


def library_path() -> Path:
    """``$M2F_OPS_LIBRARY``, else the ``_C`` extension for this Python next to the ops package.

    Raises ``NotFound`` when neither exists, ``Unusable`` when only builds for other Pythons do
    or ``$M2F_OPS_LIBRARY`` names no file."""
    named = os.environ.get(LIBRARY_ENV, "").strip()
    if named:
        if not Path(named).is_file():
            raise Unusable(f"{LIBRARY_ENV}={named} is not a file")
        return Path(named)
    stem = EXTENSION.rpartition(".")[2]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (OPS_DIR / (stem + suffix)).is_file():
            return OPS_DIR / (stem + suffix)
    others = sorted(p.name for p in OPS_DIR.glob(f"{stem}.*") if p.suffix in (".so", ".pyd", ".dylib"))
    if others:
        raise Unusable(f"the prebuilt libraries in {OPS_DIR} ({', '.join(others)}) are for another Python; "
                       f"rebuild with {INSTALL_HINT}")
    raise NotFound(f"no prebuilt library ({OPS_DIR / stem}*; {INSTALL_HINT} builds one)")


def recorded_build(path: Path) -> Optional[Tuple[str, Optional[str]]]:
    """(build id, CUDA arch list or None) recorded in the library file, read without loading it;
    None when the file records none (not built by setup.py)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(_MARKER)
            if start < 0:
                return None
            end = data.find(b"\0", start, start + 512)
            text = data[start:end if end >= 0 else start + 512].decode("ascii", "replace")
    fields = dict(item.split("=", 1) for item in text.split(";") if "=" in item)
    archs = fields.get("cuda_archs", "none")
    return fields["m2f_aot_build_id"], None if archs == "none" else archs.replace("_", ";")


def _check(path: Path) -> Optional[str]:
    """None when ``path`` holds the build this checkout and torch need, else why not."""
    try:
        recorded = recorded_build(path)
        expected = build_id()
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    if recorded is None:
        return f"{path} records no build id (it was not built by setup.py with M2F_BUILD_OPS=1)"
    if recorded[0] != expected:
        return (f"{path} was built from other sources or for another torch / Python (build id {recorded[0]}; "
                f"these sources with torch {torch.__version__} need {expected}); rebuild with {INSTALL_HINT}")
    return None


def _cuda_skip() -> str:
    """Why a loaded ahead-of-time build runs no CUDA kernel."""
    return jit.cuda_unusable() or (
        f"the ahead-of-time build has no CUDA kernel; rebuild it with TORCH_CUDA_ARCH_LIST set where nvcc is found "
        f"({INSTALL_HINT})")


def load() -> BackendInfo:
    """Load the prebuilt library into this process; raises ``NotFound`` or ``Unusable``."""
    path = library_path()
    problem = _check(path)
    if problem is not None:
        raise Unusable(problem)
    t0 = time.perf_counter()
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:  # nothing got registered: the JIT build can still load
        cause = exc.__cause__ or exc  # torch wraps the loader's own message (undefined symbol, ...)
        raise Unusable(f"loading {path} failed: {(str(cause).strip() or type(cause).__name__).splitlines()[0]}") from exc
    seconds = time.perf_counter() - t0
    arch_list = recorded_build(path)[1]
    gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
    if env.mode() == "compiled" and gpu_visible and not env.cuda_opted_out() and not jit.kernel_registered("CUDA"):
        raise toolchain.BuildError(f"a CUDA device is visible but {_cuda_skip()}")
    reason = f"ahead-of-time build (setup.py, M2F_BUILD_OPS=1) from {path}"
    return jit.loaded_info(reason, path, seconds, _cuda_skip(), arch_list, BUILD)
