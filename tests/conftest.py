"""Fixtures and helpers shared by the test files.

* ``../shared`` beside the checkout (read-only project data, see its README.md): ``parity_dir``
  (``../shared/parity``: the tiny parity models and the official outputs), ``eval_dir``
  (``../shared/eval``: a small COCO-layout set and the official evaluators' numbers) and
  :func:`require_shared` for a single file.
* CI strictness: under ``CI=true`` what CI provides (``../shared``, the ``dev`` extra's packages)
  must be there, so a test that would skip for its absence fails instead (:func:`skip_or_fail_in_ci`,
  :func:`require_module`). Skips for what CI cannot provide (a GPU, Detectron2) stay skips.
* :func:`require_compiled_cpu_ops` and ``isa``: each CPU kernel variant (M2F_OPS_CPU_ISA) in turn, for test files that define an ``op``
  fixture (the compiled op they test).
* :func:`run_python`: ``python ARGS`` from the repository root, as a user runs the command lines;
  ``ops_info_cli``: one run of ``python -m mask2former.ops info`` shared by the tests that read it;
  ``fresh_backend`` / :func:`reset_ops_backend`: the ops backend of this process as before its first
  load (test_ops*.py).
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"
EVAL = SHARED / "eval"
# ../shared/parity/manifest_<name>.json (official state-dict keys and shapes of released models);
# listed rather than globbed so that a missing ../shared cannot turn the tests into an empty set.
PARITY_MANIFESTS = ("ade20k_semantic_R50", "ade20k_semantic_swinT", "cityscapes_instance_R101", "coco_instance_R50",
                    "coco_panoptic_R50", "coco_panoptic_swinL", "mapillary_panoptic_R50")

ISAS = ("generic", "avx2", "avx512")


def in_ci() -> bool:
    """Whether the CI environment variable is set (GitHub Actions and most CI systems set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip with ``reason``; under CI=true fail with it, since CI is meant to provide the thing."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: CI provides this, so its absence is a failure, not a skip)",
                    pytrace=False)
    pytest.skip(reason)


def require_shared(path: Path) -> Path:
    """``path`` (under ../shared), or a skip (a failure under CI) that says where to get it."""
    path = Path(path)
    if not path.exists():
        skip_or_fail_in_ci(
            f"{path} not found: the read-only project data ../shared (parity/, eval/) must sit beside "
            f"the checkout, at {SHARED}; copy or mount it there")
    return path


def require_module(name: str, install: str) -> ModuleType:
    """Import ``name``, or skip (fail under CI) saying how to install it (``install``)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = e
    skip_or_fail_in_ci(f"{name} is not importable ({error}); install it with {install}")


def require_compiled_cpu_ops() -> None:
    """Skip under M2F_OPS=reference (an explicit choice of the reference); otherwise the compiled
    CPU kernels must build here: skip (fail under CI, which has the toolchain) with the reason."""
    from mask2former.ops import backend_info
    from mask2former.ops.backend import env

    if env.mode() == "reference":
        pytest.skip("M2F_OPS=reference forces the PyTorch reference")
    info = backend_info()
    if not info.cpu:
        skip_or_fail_in_ci(f"compiled CPU kernels unavailable: {info.reason}")


def run_python(args, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess from the repository root, with ``env`` added to the
    environment; text output captured."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def ops_info_cli() -> subprocess.CompletedProcess:
    """``python -m mask2former.ops info`` run once, with the CPU kernel variant capped to generic
    (M2F_OPS_CPU_ISA=generic, which any machine runs)."""
    return run_python(["-m", "mask2former.ops", "info"], M2F_OPS_CPU_ISA="generic")


def reset_ops_backend(monkeypatch) -> None:
    """The ops backend state of this process as before the first load (restored when the test
    ends): the next ``backend_info()`` reads M2F_OPS and the toolchain anew, and may warn again."""
    from mask2former.ops.backend import state

    for name, value in (("_info", None), ("_warned", False), ("_warned_cuda", False)):
        monkeypatch.setattr(state, name, value)


@pytest.fixture
def fresh_backend(monkeypatch):
    """:func:`reset_ops_backend` before the test."""
    reset_ops_backend(monkeypatch)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    small tensors, where thread start-up dominates, on a machine shared with other runs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """../shared/parity: tiny_<name>.{yaml,pkl,_io.npz}, manifest_*.json."""
    return require_shared(PARITY)


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """../shared/eval: datasets/ (COCO layout) and expected.json (the official evaluators' numbers)."""
    return require_shared(EVAL)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch, op):
    """The CPU kernel variant ``request.param``, selected with M2F_OPS_CPU_ISA. The variable only
    caps the variant (mask2former/ops/csrc/cpu_isa.h: min(best the CPU and build support, cap)),
    so a variant this machine cannot run is skipped with the reason instead of running a lower
    one under its name; ``_cpu_isa()`` reports the variant the kernels run."""
    import torch

    monkeypatch.setenv("M2F_OPS_CPU_ISA", request.param)
    active = torch.ops.mask2former._cpu_isa()
    if active != request.param:
        pytest.skip(f"CPU has no {request.param} kernel to run (the CPU or this build of the ops supports "
                    f"at most {active})")
    return request.param
