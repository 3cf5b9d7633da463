"""Build and backend layer of ``mask2former.ops``: compiles and loads the C++/CUDA library in
``../csrc`` and says which backend runs. It knows the library's files, not the Python ops: op
modules (``ms_deform_attn``, ``frozen_bn``, ``_registration``) import from here, never the
reverse, and hook into library loading with ``state.on_library_loaded``.

    env.py               M2F_OPS (auto / reference / compiled) and M2F_OPS_CUDA=0
    toolchain.py         C++ compiler / ninja / nvcc / CUDA_HOME discovery, TORCH_CUDA_ARCH_LIST,
                         reading compiler errors
    sources.py           what is compiled (csrc/ files, flags) and the build's hashed name
    jit.py               cpp_extension.load of the library, with the CPU-only fallback when the
                         CUDA build fails; returns a BackendInfo
    aot.py               the ahead-of-time build: what setup.py compiles with M2F_BUILD_OPS=1
                         (setup.py loads this package by path), and finding, checking and loading
                         the prebuilt library (mask2former/ops/_C*, or $M2F_OPS_LIBRARY)
    state.py             the process-wide backend (the ahead-of-time build when it fits, else
                         the JIT build): backend_info, build, compiled_available, one-time
                         warnings, load hooks
    cuda_check.py        CI: compile and link the CUDA build without a GPU (in a child process
                         running cuda_check_child.py)

The user-facing knobs and the build cache are described in ``mask2former/ops/__init__.py``.
Nothing is imported here, so each module keeps a single home for its names (patch them there),
and no module here imports from mask2former outside this directory: setup.py loads it by path.
"""
