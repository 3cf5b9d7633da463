"""Evaluation results as tables and files.

Results are nested dicts, ``{task: {metric: value}}`` for one test set and ``{dataset: {task:
{metric: value}}}`` for several. :func:`flatten_results` turns them into ``{"task/metric":
value}`` scalars (metrics.json, TensorBoard), :func:`format_results_table` into an aligned text
table, :func:`write_eval_results` into ``OUTPUT_DIR/eval_results.json`` (atomically), and
:func:`to_jsonable` makes any such value JSON-safe (tensors and arrays become lists, NaN and
infinities become strings, keys become strings).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Mapping

import numpy as np
import torch

from .file_io import atomic_write

__all__ = ["EVAL_RESULTS_FILE", "to_jsonable", "flatten_results", "format_results_table", "write_eval_results"]

logger = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"


def to_jsonable(value: Any) -> Any:
    """``value`` with tensors, arrays and numpy scalars as Python values and non-finite floats
    as strings (JSON has no NaN / Infinity)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"sem_seg": {"mIoU": 50.1}}`` -> ``{"sem_seg/mIoU": 50.1}`` (numbers only)."""
    out: Dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_results(v, key + "/"))
        else:
            try:
                out[key] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def format_results_table(results: Mapping[str, Any]) -> str:
    """Evaluation results as an aligned text table, one row per metric."""
    rows = [(k, f"{v:.4f}") for k, v in flatten_results(results).items()]
    if not rows:
        return "(no evaluation results)"
    width = max(len("metric"), *(len(k) for k, _ in rows))
    vwidth = max(len("value"), *(len(v) for _, v in rows))
    line = "-" * (width + vwidth + 3)
    out = [line, f"{'metric'.ljust(width)} | {'value'.rjust(vwidth)}", line]
    out += [f"{k.ljust(width)} | {v.rjust(vwidth)}" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def write_eval_results(output_dir: str, results: Mapping[str, Any]) -> str:
    """Write ``results`` to ``output_dir/eval_results.json``; returns the path."""
    path = os.path.join(output_dir, EVAL_RESULTS_FILE)
    atomic_write(path, json.dumps(to_jsonable(results), indent=2, sort_keys=False) + "\n")
    logger.info("Evaluation results written to %s", path)
    return path
