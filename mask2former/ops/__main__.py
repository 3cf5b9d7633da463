"""Command line for the compiled operators.

    python -m mask2former.ops build [-v]   build (or verify the cached build of) the kernels
    python -m mask2former.ops info         say which ms_deform_attn backend is active and why
"""
import argparse
import os
import sys

import torch

from . import _extension


def _print_info(info: _extension.BackendInfo) -> None:
    print(f"M2F_OPS: {_extension.mode()}")
    print(f"cpu backend: {info.describe('cpu')}")
    print(f"cuda backend: {info.describe('cuda')}")
    print(f"reason: {info.reason}")
    if info.compiled:
        print(f"cpu isa: {torch.ops.mask2former._cpu_isa()}")
        print(f"library: {info.library}")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        root = f"{_extension._import_cpp_extension().get_default_build_root()} (default; set TORCH_EXTENSIONS_DIR)"
    print(f"extensions dir: {root}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="compile the kernels now (an error if that fails)")
    p_build.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    sub.add_parser("info", help="print the active backend (builds the kernels if needed)")
    args = parser.parse_args(argv)

    if args.command == "build":
        try:
            info = _extension.build(verbose=args.verbose)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"built in {info.build_seconds:.1f} s: {info.library}")
        _print_info(info)
        return 0
    # info: any build failure is reported through the info (and a warning), not raised,
    # unless M2F_OPS=compiled.
    try:
        info = _extension.backend_info()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
