"""The process-wide backend of the compiled operators.

``backend_info`` loads the library once and caches the ``BackendInfo``: the ahead-of-time build
(``aot.py``, from ``setup.py`` with ``M2F_BUILD_OPS=1``) when there is one for these sources and
this torch, else the JIT build (``jit.py``, compiled on first use). A prebuilt library that is
there but cannot be used is reported with one warning and the JIT build is used (under
``M2F_OPS=compiled`` it is an error). With ``M2F_OPS=compiled`` a build failure raises
RuntimeError, otherwise it warns once and reports the reference backend. ``build`` forces a
build. ``compiled_available(device_type)`` is what op wrappers ask before calling a compiled op;
for CUDA tensors that must run the reference although the library was built it warns once
(unless ``M2F_OPS_CUDA=0``).

``on_library_loaded(hook)``: op modules register here what must happen once the library is
loaded (fake kernels, autograd); this module does not know the ops.
"""
import dataclasses
import threading
import warnings
from typing import Callable, List, Optional, Tuple

import torch

from . import aot, env, jit
from .jit import BackendInfo
from .toolchain import BuildError

__all__ = ["BackendInfo", "backend_info", "build", "compiled_available", "on_library_loaded"]

_lock = threading.Lock()
_info: Optional[BackendInfo] = None
_warned = False
_warned_cuda = False
_load_hooks: List[Callable[[], None]] = []


def on_library_loaded(hook: Callable[[], None]) -> None:
    """Call ``hook()`` now and after every load of the library by this module.

    Calling it now covers a library that is already loaded (by an earlier ``backend_info`` or
    by ``torch.ops.load_library``), so a hook must be idempotent and do nothing while its
    operators are not registered yet."""
    if hook not in _load_hooks:
        _load_hooks.append(hook)
    hook()


def _load_aot() -> Tuple[Optional[BackendInfo], Optional[str]]:
    """(the loaded ahead-of-time build, None), or (None, why there is none in use)."""
    if env.mode() == "reference":
        return None, None
    try:
        return aot.load(), None
    except aot.NotFound as exc:
        return None, str(exc)
    except aot.Unusable as exc:
        if env.mode() == "compiled":
            raise BuildError(f"the ahead-of-time build cannot be used: {exc}") from exc
        warnings.warn(
            f"mask2former.ops: not using the ahead-of-time build ({exc}); building the kernels now instead (JIT)",
            RuntimeWarning,
            stacklevel=5,
        )
        return None, str(exc)


def _load(verbose: bool) -> BackendInfo:
    info, aot_reason = _load_aot()
    if info is None:
        info = jit.load(verbose)
        if info.compiled:
            info = dataclasses.replace(info, aot_reason=aot_reason)
    if info.compiled:
        for hook in list(_load_hooks):
            hook()
    return info


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
            except BuildError as exc:
                if env.mode() == "compiled":
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
    if env.mode() == "reference":
        raise RuntimeError("M2F_OPS=reference: not building the compiled kernels")
    with _lock:
        if _info is None or not _info.compiled:
            try:
                _info = _load(verbose)
            except BuildError as exc:
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
    if env.mode() == "reference":
        return False
    info = backend_info()
    if device_type == "cpu":
        return info.cpu
    if device_type == "cuda":
        if not info.cuda and info.compiled and not env.cuda_opted_out():
            _warn_once(
                "cuda",
                f"mask2former.ops: CUDA tensors use the PyTorch reference for ms_deform_attn "
                f"({info.cuda_reason}). Set M2F_OPS_CUDA=0 to silence this, or see "
                "`python -m mask2former.ops info`.",
                stacklevel=3,
            )
        return info.cuda
    return False
