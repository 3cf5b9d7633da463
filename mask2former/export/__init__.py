"""Export a model to ONNX or torch.export, and run the exported file like the model.

    python -m mask2former.export --config-file CFG --format onnx|torch --output PATH
                                 [--height H --width W] [KEY VALUE ...]

* :func:`export_model` (``exporters.py``): the network from the normalised, padded image batch
  (N, 3, H, W) to ``pred_logits`` (N, Q, K+1) and ``pred_masks`` (N, Q, H/4, W/4), with dynamic
  batch and, except for kMaX-DeepLab (one input size), dynamic height and width in multiples of
  the size divisibility (``network.py``). ONNX uses standard operators only; the ``.pt2`` program
  keeps ``mask2former::ms_deform_attn`` as one operator.
* :func:`load_exported` (``runtime.py``): an :class:`ExportedModel` called like the model
  (``[{"image", "height", "width"}] -> [{"sem_seg" | "panoptic_seg" | "instances"}]``) whose
  pre- and post-processing are the model's own code, on ONNX Runtime, OpenVINO or torch.

Layout: ``network.py`` (what is exported, input sizes), ``exporters.py`` (the two formats, metadata),
``runtime.py`` (loading and running), ``__main__.py`` (the command line).
"""
from .exporters import FORMATS, ExportResult, export_model
from .network import ExportError, ExportNetwork, input_spec
from .runtime import ExportedModel, load_exported, skeleton_model

__all__ = ["export_model", "load_exported", "ExportedModel", "ExportError", "ExportNetwork", "ExportResult",
           "input_spec", "skeleton_model", "FORMATS"]
