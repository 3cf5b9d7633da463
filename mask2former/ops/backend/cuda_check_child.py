"""Child process of ``cuda_check.build_cuda_sources_for_check`` (CI): build and try to load the
CUDA variant of the library, then print one line ``M2F_CHECK_RESULT {"loaded", "registered",
"error"}`` as JSON.

Run as a script, ``python cuda_check_child.py '<cpp_extension.load kwargs as JSON>' <op>``, with
``TORCH_CUDA_ARCH_LIST`` and ``CUDA_HOME`` in the environment; ``registered`` says whether
``<op>`` (e.g. ``mask2former::ms_deform_attn``) got a CUDA kernel. It imports nothing from
mask2former: loading the library registers the ``mask2former`` operator namespace, which is why
this runs in a process of its own.
"""
import json
import logging
import sys

MARKER = "M2F_CHECK_RESULT "


def main(argv) -> int:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch
    from torch.utils import cpp_extension

    kwargs, op = json.loads(argv[0]), argv[1]
    out = {"loaded": False, "registered": False, "error": None}
    try:
        cpp_extension.load(**kwargs)
        out["loaded"] = True
        out["registered"] = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except Exception as exc:  # the build itself failed, or only loading the result did
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(MARKER + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
