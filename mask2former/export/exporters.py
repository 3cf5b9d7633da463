"""Export a built model's network (:class:`~mask2former.export.network.ExportNetwork`) to a file.

* ``onnx`` (``.onnx``): ``torch.onnx.export`` (the torch.export-based exporter), opset 18,
  standard operators only: multi-scale deformable attention is traced as its PyTorch reference
  (``grid_sample`` per level, ONNX GridSample), so ONNX Runtime and OpenVINO need no custom-op
  library. The graph passes ``onnx.checker.check_model(full_check=True)`` before it is written.
* ``torch`` (``.pt2``): ``torch.export.export`` + ``torch.export.save``. The compiled
  ``mask2former::ms_deform_attn`` stays one operator (its fake kernel gives the shapes), so the
  program runs the C++ / CUDA kernel; loading it needs this package imported (which registers the op).
  The graph is general in batch, height and width, but torch.export also records guards that are
  stricter than the graph: for a Swin backbone, that no stage has a single window along a side
  (its stride reasoning cannot show that case harmless; ONNX keeps no guards at all).
  :mod:`~mask2former.export.runtime` therefore checks the input sizes itself and runs the program
  without torch's guard checks; tests/test_export.py compares it with the eager model on such inputs.

Both trace the plain modules (``model.fast_inference = False`` for the duration: accelerations
are eager-only) in eval mode without autograd, and record metadata (:data:`METADATA_KEYS`) that
:func:`mask2former.export.load_exported` checks against the config it is given.
Files are written atomically: a failed export leaves no file behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import traceback
from typing import Dict, Optional

import torch
from torch import nn

from ..ops import backend_info, reference_kernels
from ..utils.file_io import atomic_write
from .network import INPUT_NAME, OUTPUT_NAMES, ExportError, ExportNetwork, input_spec

__all__ = ["FORMATS", "METADATA_KEYS", "export_model", "model_metadata", "ExportResult"]

logger = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
METADATA_KEYS = ("meta_architecture", "num_classes", "num_queries", "divisibility", "fixed_size")
ONNX_OPSET = 18
# torch.export.save's extra file holding the metadata
PT2_METADATA = "mask2former.json"


class ExportResult(dict):
    """What :func:`export_model` did: ``path``, ``format``, ``seconds``, ``bytes``, ``metadata``."""


def model_metadata(model: nn.Module, spec) -> Dict[str, str]:
    """The facts :func:`load_exported` checks against its config (all strings: ONNX metadata)."""
    return {
        "meta_architecture": type(model).__name__,
        "num_classes": str(int(model.sem_seg_head.num_classes)),
        "num_queries": str(int(model.num_queries)),
        "divisibility": str(spec.divisibility),
        "fixed_size": json.dumps(list(spec.fixed_size) if spec.fixed_size else None),
    }


@contextlib.contextmanager
def _plain_eval(model: nn.Module):
    """The plain modules in eval mode for the duration; the model's state is restored after."""
    was_training, fast = model.training, getattr(model, "fast_inference", False)
    model.eval()
    if fast:
        model.fast_inference = False
    try:
        with torch.no_grad():
            yield
    finally:
        if fast:
            model.fast_inference = True
        model.train(was_training)


def _cfg_names(cfg) -> Dict[str, str]:
    if cfg is None:
        return {}
    return {"MODEL.BACKBONE.NAME": cfg.MODEL.BACKBONE.NAME, "MODEL.SEM_SEG_HEAD.NAME": cfg.MODEL.SEM_SEG_HEAD.NAME,
            "MODEL.META_ARCHITECTURE": cfg.MODEL.META_ARCHITECTURE}


def _where(exc: BaseException) -> str:
    """The innermost frame of this package (or a user's module) in the traceback of ``exc``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "site-packages/torch" not in f.filename and f.filename != __file__]
    return f" (at {frames[-1].filename}:{frames[-1].lineno}, {frames[-1].name})" if frames else ""


def _diagnose(model: nn.Module, exc: BaseException, fmt: str, cfg) -> ExportError:
    """An ExportError naming the part that does not export: the backbone is traced alone to tell
    a backbone failure from a head failure."""
    message = str(exc).strip()
    first_line = message.splitlines()[0] if message else type(exc).__name__
    names = _cfg_names(cfg)
    try:
        torch.export.export(model.backbone, (input_spec(model).example,), strict=False)
        part, key, module = "the head", "MODEL.SEM_SEG_HEAD.NAME", model.sem_seg_head
    except Exception:  # noqa: BLE001 - any failure here means the backbone does not export
        part, key, module = "the backbone", "MODEL.BACKBONE.NAME", model.backbone
    name = names.get(key, type(module).__name__)
    return ExportError(f"{part} ({key} {name!r}, {type(module).__name__}) does not export to {fmt}: "
                       f"{type(exc).__name__}: {first_line}{_where(exc)}")


def _export_onnx(net: ExportNetwork, spec, metadata: Dict[str, str]) -> bytes:
    import onnx

    with reference_kernels():
        program = torch.onnx.export(
            net, (spec.example,), dynamic_shapes=spec.dynamic_shapes, dynamo=True, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), verbose=False)
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=f"mask2former.{key}", value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _export_torch(net: ExportNetwork, spec, metadata: Dict[str, str]):
    info = backend_info()
    if not info.compiled:
        logger.warning("the compiled ms_deform_attn is not available (%s): the .pt2 program traces the PyTorch "
                       "reference instead of the operator", info.reason)
    program = torch.export.export(net, (spec.example,), dynamic_shapes=spec.dynamic_shapes, strict=False)
    program.example_inputs = None  # not saved: the example is zeros (23 MB at 800x1216)
    extra = {PT2_METADATA: json.dumps(metadata)}
    return lambda f: torch.export.save(program, f, extra_files=extra)


def require_onnx():
    """Import onnx and onnxruntime, or fail with the install hint."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnx and onnxruntime ({exc}); install them with "
                          "pip install 'mask2former[export]' (or pip install onnx onnxruntime onnxscript)") from exc


def export_model(model: nn.Module, path: str, fmt: Optional[str] = None, *, height: Optional[int] = None,
                 width: Optional[int] = None, cfg=None) -> ExportResult:
    """Export ``model``'s network to ``path`` as ``fmt`` ("onnx" or "torch"; by default from the
    suffix, ``.onnx`` or ``.pt2``). ``height`` / ``width``: the traced example's size (see
    :func:`~mask2former.export.network.input_spec`). ``cfg``: the model's config, for messages.
    Raises :class:`ExportError` naming the part that does not export."""
    if fmt is None:
        fmt = next((f for f, suffix in FORMATS.items() if str(path).endswith(suffix)), None)
        if fmt is None:
            raise ExportError(f"cannot tell the format of {path!r} from its suffix; name it *.onnx or *.pt2, or "
                              f"pass the format ({sorted(FORMATS)})")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {sorted(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    net = ExportNetwork(model).eval()
    spec = input_spec(model, height, width)
    start = time.perf_counter()
    with _plain_eval(model):
        metadata = model_metadata(model, spec)  # the plain class's name, not an accelerated one's
        try:
            content = (_export_onnx if fmt == "onnx" else _export_torch)(net, spec, metadata)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises many types; all mean "does not export"
            raise _diagnose(model, exc, fmt, cfg) from exc
    atomic_write(path, content)
    seconds = time.perf_counter() - start
    size = os.path.getsize(path)
    logger.info("exported %s to %s (%s, %.1f MB) in %.1f s", metadata["meta_architecture"], path, fmt, size / 2**20,
                seconds)
    return ExportResult(path=str(path), format=fmt, seconds=seconds, bytes=size, metadata=metadata)
