"""Packaging of mask2former (the metadata lives in pyproject.toml) and the optional ahead-of-time
build of its compiled operators (mask2former/ops/csrc):

    pip install -e .                                        nothing is compiled: the ops are built
                                                            on first use (JIT), as before
    M2F_BUILD_OPS=1 pip install --no-build-isolation -e .   compile mask2former/ops/_C<EXT_SUFFIX> now

M2F_BUILD_OPS is 0 (default) or 1. With 1 this script needs torch, which pip's isolated build
environment lacks: hence --no-build-isolation. The CUDA kernel joins the build when torch has CUDA,
nvcc is found (CUDA_HOME) and TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") or a visible GPU names the
architectures; M2F_OPS_CUDA=0 leaves it out. Without M2F_BUILD_OPS this script imports neither
torch nor mask2former.

What is compiled (sources, flags) is defined once, in mask2former/ops/backend/ (aot.py on top of
sources.py, which the JIT build uses too). That directory is loaded here by path as a stand-alone
package: importing mask2former would import torch and the whole model.
"""
import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BACKEND = ROOT / "mask2former" / "ops" / "backend"


def build_ops_requested() -> bool:
    value = os.environ.get("M2F_BUILD_OPS", "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"M2F_BUILD_OPS must be 0 or 1 (1: compile the ops at install time); got {value!r}")
    return value == "1"


def load_backend_module(name: str):
    """``mask2former.ops.backend.<name>``, imported as ``_m2f_ops_backend.<name>`` (the backend
    package imports nothing outside itself)."""
    package = "_m2f_ops_backend"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            package, BACKEND / "__init__.py", submodule_search_locations=[str(BACKEND)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


def ops_setup_kwargs(aot, cpp_extension, spec) -> dict:
    """``ext_modules`` and ``cmdclass`` that build ``spec`` (an ``aot.ExtensionSpec``)."""
    compile_args = {"cxx": spec.cflags}
    kind = cpp_extension.CppExtension
    if spec.arch_list:
        compile_args["nvcc"] = spec.cuda_cflags
        kind = cpp_extension.CUDAExtension
    extension = kind(aot.EXTENSION, [os.path.relpath(s, ROOT) for s in spec.sources],
                     extra_compile_args=compile_args, extra_link_args=spec.ldflags)

    class BuildOps(cpp_extension.BuildExtension):
        def get_export_symbols(self, ext):
            return []  # a library of torch operators, not a Python module: no PyInit_ to export

    return dict(ext_modules=[extension], cmdclass={"build_ext": BuildOps})


if build_ops_requested():
    aot, toolchain = load_backend_module("aot"), load_backend_module("toolchain")
    spec = aot.extension_spec()
    print(f"M2F_BUILD_OPS=1: building {aot.EXTENSION} with {spec.describe()}")
    # CUDAExtension and the build read CUDA_HOME and TORCH_CUDA_ARCH_LIST: point them at the
    # toolkit and architectures chosen above.
    with toolchain.CudaBuildEnv(spec.cuda_home, spec.arch_list) if spec.arch_list else contextlib.nullcontext():
        setup(**ops_setup_kwargs(aot, toolchain.import_cpp_extension(), spec))
else:
    setup()
