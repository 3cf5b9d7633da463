"""Command line for the compiled operators.

    python -m mask2former.ops build [-v]   build (or verify the cached build of) the kernels
    python -m mask2former.ops build --cuda-check [--arch-list "8.0;9.0"] [--build-dir DIR] [-v]
                                           compile + link the CUDA kernels without a GPU (CI)
    python -m mask2former.ops info         say which kernels run (ms_deform_attn, frozen_bn_act) and why,
                                           and which build is loaded: "ahead-of-time build: <path>"
                                           (setup.py, M2F_BUILD_OPS=1) or "JIT build: <path>"
"""
import argparse
import os
import sys

import torch

from .backend import aot, cuda_check, env, state, toolchain
from .backend.jit import BackendInfo
from .frozen_bn import frozen_bn_act_compiled


def _cuda_state() -> str:
    if torch.version.cuda is None:
        return "torch built without CUDA"
    if not torch.cuda.is_available():
        return f"torch CUDA {torch.version.cuda}, no device visible"
    devices = ", ".join(
        f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
        for i in range(torch.cuda.device_count())
    )
    return f"torch CUDA {torch.version.cuda}, {devices}"


def _print_info(info: BackendInfo) -> None:
    print(f"M2F_OPS: {env.mode()}")
    print(f"cpu backend: {info.describe('cpu')}")
    cuda = info.describe("cuda")
    if info.cuda:
        cuda += f" (TORCH_CUDA_ARCH_LIST={info.cuda_arch_list})"
    elif info.cuda_reason:
        cuda += f" ({info.cuda_reason})"
    print(f"cuda backend: {cuda}")
    print(f"cuda: {_cuda_state()}; nvcc: {toolchain.cuda_home() or 'not found'}")
    print(f"reason: {info.reason}")
    if info.compiled:
        print(f"cpu isa: {torch.ops.mask2former._cpu_isa()}")
        bitwise = frozen_bn_act_compiled()
        print(f"frozen_bn_act: {'compiled CPU' if bitwise else 'reference'} "
              f"(kernel {'matches' if bitwise else 'does not match'} torch's batch_norm bitwise)")
        print(f"library: {info.library}")
        print(f"{info.build} build: {info.library}")
    if info.aot_reason:
        print(f"{aot.BUILD} build not used: {info.aot_reason}")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        root = f"{toolchain.import_cpp_extension().get_default_build_root()} (default; set TORCH_EXTENSIONS_DIR)"
    print(f"extensions dir: {root}")


def _cuda_check(args) -> int:
    try:
        res = cuda_check.build_cuda_sources_for_check(args.arch_list, build_dir=args.build_dir, verbose=args.verbose)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CUDA sources compiled and linked for TORCH_CUDA_ARCH_LIST={res.arch_list} in {res.seconds:.1f} s")
    print(f"library: {res.library}")
    if res.loaded:
        print(f"loaded in a child process; CUDA kernel registered: {res.cuda_kernel_registered}")
    else:
        print(f"not loadable here (fine without a GPU): {res.load_error}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="compile the kernels now (an error if that fails)")
    p_build.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    p_build.add_argument(
        "--cuda-check",
        action="store_true",
        help="only compile and link the CUDA build (no GPU needed; does not change what this machine uses)",
    )
    p_build.add_argument("--arch-list", default="8.0;9.0", help="TORCH_CUDA_ARCH_LIST for --cuda-check (default: %(default)s)")
    p_build.add_argument("--build-dir", default=None, help="build directory for --cuda-check (default: in the extensions dir)")
    sub.add_parser("info", help="print the active backend (builds the kernels if needed)")
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.cuda_check:
            return _cuda_check(args)
        try:
            info = state.build(verbose=args.verbose)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if info.build == aot.BUILD:
            print(f"nothing to build, the {aot.BUILD} build is loaded: {info.library}")
        else:
            print(f"built in {info.build_seconds:.1f} s: {info.library}")
        _print_info(info)
        return 0
    # info: any build failure is reported through the info (and a warning), not raised,
    # unless M2F_OPS=compiled.
    try:
        info = state.backend_info()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
