"""Backend selection from the environment, read on every call.

``M2F_OPS``: ``auto`` (default; compiled kernels, else the PyTorch reference with one warning),
``reference`` (never build) or ``compiled`` (failing to build is an error).
``M2F_OPS_CUDA=0`` leaves the CUDA kernel out of the build (CUDA tensors then run the reference
without a warning). ``M2F_OPS_CPU_ISA`` is read by the CPU kernels themselves (``csrc/cpu_isa.h``).
"""
import os

__all__ = ["MODES", "mode", "cuda_opted_out"]

MODES = ("auto", "reference", "compiled")


def mode() -> str:
    """The value of ``M2F_OPS`` (auto / reference / compiled)."""
    value = os.environ.get("M2F_OPS", "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"M2F_OPS must be one of {', '.join(MODES)}; got {value!r}")
    return value


def cuda_opted_out() -> bool:
    """Whether ``M2F_OPS_CUDA=0`` asked to build without the CUDA kernel."""
    return os.environ.get("M2F_OPS_CUDA", "1").strip() == "0"
