"""Run an exported network like the model: :func:`load_exported`.

The returned :class:`ExportedModel` is called like the eager model (``[{"image", "height",
"width"}] -> [{"sem_seg" | "panoptic_seg" | "instances" | ...}]``) and runs the eager model's own
code around the exported network: the meta architecture is built from the config on the ``meta``
device (no weights are allocated; only ``pixel_mean`` / ``pixel_std`` are real) and its
``predict_padded`` is replaced by the runner. Input checks, normalisation, padding to the size
divisibility (or to kMaX's INPUT.IMAGE_SIZE), batching by padded size and the three tasks'
post-processing are therefore the same code as in eager mode, not a copy.

Runners: ONNX Runtime (default for ``.onnx``; CPU unless ``providers`` says otherwise), OpenVINO
(``runtime="openvino"`` for ``.onnx``, when installed) and the torch ``ExportedProgram``
(``.pt2``, loaded with ``torch.export.load``; it calls the compiled ``mask2former::ms_deform_attn``).

Safety: an ONNX file is a protobuf and runs no code on loading. ``torch.export.load`` can unpickle
parts of a ``.pt2`` archive, so :func:`check_pt2_archive` refuses every archive that holds a
pickle it would load unsafely before torch reads it.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..utils.registry import META_ARCH_REGISTRY
from .exporters import FORMATS, METADATA_KEYS, PT2_METADATA, model_metadata, require_onnx
from .network import INPUT_NAME, MAX_BATCH, MAX_SIDE, OUTPUT_NAMES, ExportError, input_spec

__all__ = ["ExportedModel", "load_exported", "skeleton_model", "check_input", "check_pt2_archive", "RUNTIMES"]

RUNTIMES = ("onnxruntime", "openvino", "torch")

Runner = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


def skeleton_model(cfg, device: str = "cpu") -> nn.Module:
    """The meta architecture of ``cfg`` without weights: modules on the ``meta`` device, only the
    normalisation buffers real (on ``device``). Its pre- and post-processing run; its network does not."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        raise KeyError(f"MODEL.META_ARCHITECTURE = {name!r} is not registered; known: "
                       f"{sorted(k for k, _ in META_ARCH_REGISTRY)}")
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(name)(cfg)
    for key, values in (("pixel_mean", cfg.MODEL.PIXEL_MEAN), ("pixel_std", cfg.MODEL.PIXEL_STD)):
        model.register_buffer(key, torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1),
                             persistent=False)
    return model.eval()


def _as_outputs(logits, masks) -> Dict[str, torch.Tensor]:
    return {OUTPUT_NAMES[0]: torch.as_tensor(logits), OUTPUT_NAMES[1]: torch.as_tensor(masks)}


def _onnxruntime_runner(path: str, providers: Optional[Sequence] = None, threads: Optional[int] = None):
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # idle worker threads sleep instead of spinning: the model's own pre- and post-processing (torch)
    # runs between network calls on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=list(providers or ["CPUExecutionProvider"]))
    metadata = {k[len("mask2former."):]: v for k, v in session.get_modelmeta().custom_metadata_map.items()
                if k.startswith("mask2former.")}

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_input(images, metadata, path)
        feed = {INPUT_NAME: images.detach().to("cpu", torch.float32).contiguous().numpy()}
        return _as_outputs(*(torch.from_numpy(np.asarray(x)) for x in session.run(list(OUTPUT_NAMES), feed)))

    return run, metadata


def _openvino_runner(path: str, threads: Optional[int] = None):
    try:
        import openvino as ov
    except ImportError as exc:
        raise ImportError(f"runtime='openvino' needs OpenVINO ({exc}); pip install openvino") from exc
    core = ov.Core()
    # float32 as exported: on CPUs with bf16 support OpenVINO would otherwise compute in bf16
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    model = core.read_model(path)
    compiled = core.compile_model(model, "CPU", config)
    # the ONNX metadata_props, as OpenVINO keeps them (no second parse of the file)
    info = model.get_rt_info()
    framework = info["framework"] if "framework" in info else {}
    metadata = {k[len("mask2former."):]: model.get_rt_info(["framework", k]).astype(str)
                for k in framework if k.startswith("mask2former.")}

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_input(images, metadata, path)
        out = compiled(images.detach().to("cpu", torch.float32).contiguous().numpy())
        return _as_outputs(*(torch.from_numpy(np.asarray(out[compiled.output(i)])) for i in range(2)))

    return run, metadata


# members of a .pt2 archive torch.export.load may unpickle (weights_only=False), by what says so
_PICKLED_PREFIXES = ("custom_obj", "opaque_obj")


def check_pt2_archive(path: str) -> None:
    """Refuse a .pt2 file that could run code when ``torch.export.load`` reads it: that loader
    unpickles payloads flagged ``use_pickle``, custom and opaque objects, and retries a ``.pt``
    member with ``weights_only=False`` when the safe load fails. Allowed: JSON, raw tensor bytes,
    and ``.pt`` members that ``torch.load(weights_only=True)`` reads. What this package writes
    passes; anything else raises ExportError naming the member."""
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExportError(f"{path} is not a .pt2 archive: {exc}") from exc
    with archive:
        for name in archive.namelist():
            base = name.rsplit("/", 1)[-1]
            if base.startswith(_PICKLED_PREFIXES):
                raise ExportError(f"{path}: member {name} is a pickled object, which could run code; refused")
            if name.endswith("_config.json"):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError) as exc:
                    raise ExportError(f"{path}: member {name} is not a JSON payload table: {exc}") from exc
                pickled = [k for k, v in config.items() if isinstance(v, dict) and v.get("use_pickle")]
                if pickled:
                    raise ExportError(f"{path}: {name} stores {pickled[:3]} as pickles, which could run code; refused")
            elif name.endswith((".pt", ".pkl", ".pth")) and archive.getinfo(name).file_size:  # empty: not read
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any failure of the safe load means "refuse"
                    raise ExportError(f"{path}: member {name} is not plain tensors (torch.load(weights_only=True) "
                                      f"fails: {type(exc).__name__}), and torch would unpickle it; refused") from exc


def _torch_runner(path: str, device: str):
    from .. import ops  # noqa: F401  registers mask2former::* and their fake kernels

    check_pt2_archive(path)
    try:
        ops.build()  # a program that calls the compiled operator needs the library loaded first
        unavailable = None
    except RuntimeError as exc:  # M2F_OPS=reference, no compiler: fine for a program traced without the op
        unavailable = str(exc)
    extra = {PT2_METADATA: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except RuntimeError as exc:
        if unavailable is None:
            raise
        raise ExportError(f"{path} calls the compiled mask2former ops, which are unavailable here ({unavailable}); "
                          "export the model again under M2F_OPS=reference for a program without them, or let them build "
                          "(python -m mask2former.ops info says why they do not)") from exc
    # torch's guards are stricter than the graph (see exporters.py); check_input does the real checks
    module = program.module(check_guards=False).to(device)
    metadata = json.loads(extra[PT2_METADATA]) if extra[PT2_METADATA] else {}

    def run(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_input(images, metadata, path)
        with torch.no_grad():
            return _as_outputs(*module(images.to(device, torch.float32)))

    return run, metadata


def check_input(images: torch.Tensor, metadata: Dict[str, str], path: str) -> None:
    """The sizes an exported network serves (see :func:`~mask2former.export.network.input_spec`):
    (N, 3, H, W), 1 <= N <= MAX_BATCH, H and W multiples of the divisibility up to MAX_SIDE, or
    the fixed size. The model's own padding always gives such a batch; a direct caller may not."""
    fixed = json.loads(metadata.get("fixed_size") or "null")
    d = int(metadata.get("divisibility") or 0)
    if images.dim() != 4 or not 1 <= images.shape[0] <= MAX_BATCH:
        raise ValueError(f"{path} takes images (N, C, H, W) with 1 <= N <= {MAX_BATCH}; got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if fixed is not None and [h, w] != list(fixed):
        raise ValueError(f"{path} runs at {fixed[0]}x{fixed[1]} (INPUT.IMAGE_SIZE) only; got {h}x{w}")
    if fixed is None and (h % d or w % d or max(h, w) > MAX_SIDE):
        raise ValueError(f"{path} takes heights and widths that are multiples of {d} up to {MAX_SIDE}; got {h}x{w}")


class ExportedModel:
    """Called like the model; see the module docstring. ``model``: the skeleton meta architecture
    whose ``predict_padded`` is ``runner``; ``metadata``: what the exported file recorded."""

    def __init__(self, model: nn.Module, runner: Runner, metadata: Dict[str, str], path: str, runtime: str):
        self.model, self.runner, self.metadata, self.path, self.runtime = model, runner, metadata, path, runtime
        model.predict_padded = runner  # the instance attribute shadows the method: inference calls the runner

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        with torch.no_grad():
            return self.model.inference(batched_inputs)

    def __repr__(self) -> str:
        return f"ExportedModel({self.path!r}, runtime={self.runtime!r}, {self.metadata.get('meta_architecture')})"


def _check_metadata(path: str, stored: Dict[str, str], expected: Dict[str, str]) -> None:
    if not stored:
        raise ExportError(f"{path} carries no mask2former metadata: it was not written by mask2former.export")
    for key in METADATA_KEYS:
        if stored.get(key) != expected[key]:
            raise ExportError(f"{path} was exported with {key} = {stored.get(key)}, but the config gives "
                              f"{expected[key]}: load it with the config it was exported from")


def load_exported(path: str, cfg, runtime: Optional[str] = None, *, providers: Optional[Sequence] = None,
                  threads: Optional[int] = None) -> ExportedModel:
    """The exported network at ``path`` (``.onnx`` or ``.pt2``) wrapped as a model of ``cfg``.
    ``runtime``: "onnxruntime" (default for .onnx), "openvino" (.onnx) or "torch" (.pt2);
    ``providers``: ONNX Runtime execution providers; ``threads``: intra-op threads of ONNX Runtime /
    OpenVINO (their default: all cores). The file's metadata must match ``cfg`` (ExportError)."""
    path = str(path)
    suffix = next((s for s in FORMATS.values() if path.endswith(s)), None)
    if suffix is None:
        raise ExportError(f"{path}: expected an exported file named *.onnx or *.pt2")
    runtime = runtime or ("onnxruntime" if suffix == ".onnx" else "torch")
    if runtime not in RUNTIMES or (runtime == "torch") != (suffix == ".pt2"):
        raise ExportError(f"runtime {runtime!r} cannot run {path}: .onnx runs on onnxruntime or openvino, .pt2 on torch")
    model = skeleton_model(cfg, cfg.MODEL.DEVICE if runtime == "torch" else "cpu")
    if runtime == "onnxruntime":
        runner, stored = _onnxruntime_runner(path, providers, threads)
    elif runtime == "openvino":
        runner, stored = _openvino_runner(path, threads)
    else:
        runner, stored = _torch_runner(path, cfg.MODEL.DEVICE)
    _check_metadata(path, stored, model_metadata(model, input_spec(model)))
    return ExportedModel(model, runner, stored, path, runtime)
