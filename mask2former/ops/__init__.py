"""Custom operators. ``ms_deform_attn`` runs compiled kernels when they can be built and the
PyTorch reference otherwise (``python -m mask2former.ops info`` says which and why);
``ms_deform_attn_from_offsets`` (what ``MSDeformAttn`` calls) adds the offsets to the reference
points inside an inference-only CPU kernel, bitwise as torch would;
``frozen_bn_act`` (inference FrozenBatchNorm2d + residual + ReLU) runs its compiled CPU kernel
only where that reproduces the reference bitwise.

Layout (imports go one way, down this list):
    __init__.py, __main__.py   the public names; ``python -m mask2former.ops build|info``
    _registration.py           fake kernels and autograd of the compiled ops, installed through
                               a load hook of the backend (the C++ library names this module)
    ms_deform_attn.py, frozen_bn.py   wrappers, references and input checks of each op
    backend/                   build (JIT, or ahead-of-time through ../../setup.py), load and state
                               of the C++ library (knows no op module)
    csrc/                      C++/CUDA sources; ``library.cpp`` declares every op's schema
    _extension.py              alias of the names ``backend/`` now holds

Build: the sources in ``csrc/`` ship as package data and are compiled on first use with
``torch.utils.cpp_extension.load`` (ninja) into the torch extensions directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/<py>_<cu>/``). The build
directory's name carries a hash of the sources, the flags and the torch version, so checkouts
with different sources never rebuild each other's copy; concurrent processes build once.
``pip install`` needs neither torch nor a compiler.

Ahead-of-time build (``backend/aot.py``), for machines that cannot compile at run time (cluster
compute nodes without a compiler): ``M2F_BUILD_OPS=1 pip install --no-build-isolation -e .``
compiles the same sources with the same flags at install time, through the top-level
``setup.py``, into ``mask2former/ops/_C<EXT_SUFFIX>`` (CUDA included when torch has CUDA, nvcc is
found and ``$TORCH_CUDA_ARCH_LIST`` or a visible GPU names the architectures). When that file
(or the one ``$M2F_OPS_LIBRARY`` names) records the build id of these sources, this torch and
this Python, it is loaded instead of the JIT build; a prebuilt library that does not fit or does
not load is reported with one warning and the JIT build is used (an error under
``M2F_OPS=compiled``). ``python -m mask2former.ops info`` prints ``ahead-of-time build: <path>``
or ``JIT build: <path>`` and, for the latter, why no ahead-of-time build was used.

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
``python -m mask2former.ops build --cuda-check`` compiles and links the CUDA build without a
GPU (CI; ``backend/cuda_check.py``).

Adding a device: put its source in ``csrc/`` with a ``TORCH_LIBRARY_IMPL(mask2former, <Key>, m)``
block; the schemas (``csrc/library.cpp``), the input checks (``csrc/ms_deform_attn.h``), the fake
kernels and autograd are shared, and ``ms_deform_attn`` routes CPU / CUDA tensors to the
compiled op once a kernel is registered for their device.
"""
from .backend.jit import BackendInfo
from .backend.state import backend_info, build
from .frozen_bn import frozen_bn_act, frozen_bn_act_compiled, frozen_bn_act_reference, frozen_bn_act_uses_compiled
from .ms_deform_attn import (
    check_ms_deform_attn_inputs,
    check_ms_deform_attn_offsets_shapes,
    check_ms_deform_attn_shapes,
    ms_deform_attn,
    ms_deform_attn_from_offsets,
    level_shapes_tensor,
    level_start_tensor,
    ms_deform_attn_reference,
    reference_kernels,
    sampling_locations_from_offsets,
)
from . import _registration  # noqa: F401  installs the fake kernel / autograd load hook

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "check_ms_deform_attn_inputs",
    "check_ms_deform_attn_shapes",
    "check_ms_deform_attn_offsets_shapes",
    "ms_deform_attn_from_offsets",
    "sampling_locations_from_offsets",
    "level_shapes_tensor",
    "level_start_tensor",
    "reference_kernels",
    "frozen_bn_act",
    "frozen_bn_act_reference",
    "frozen_bn_act_compiled",
    "frozen_bn_act_uses_compiled",
    "backend_info",
    "build",
    "BackendInfo",
]
