"""The two id conventions every dataset, evaluator and exporter shares.

* **Panoptic PNGs** (COCO panoptic format) store segment id ``R + 256 G + 256^2 B`` per pixel:
  :func:`rgb2id` / :func:`id2rgb`.
* **Category ids.** Models predict *contiguous* ids ``0..K-1``; annotation files use the dataset's
  own ids. Metadata maps dataset -> contiguous in ``thing_dataset_id_to_contiguous_id`` and
  ``stuff_dataset_id_to_contiguous_id`` (for panoptic datasets the stuff table lists every class,
  the thing table only the things). :func:`category_table` reads one of them with int keys and
  values (JSON round trips turn keys into strings); :func:`contiguous_to_dataset` inverts it.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = ["PANOPTIC_ID_LIMIT", "rgb2id", "id2rgb", "category_table", "contiguous_to_dataset"]

#: segment ids must fit in the 24 bits of an RGB pixel
PANOPTIC_ID_LIMIT = 256 ** 3


def rgb2id(color: np.ndarray) -> np.ndarray:
    """(H, W, 3+) RGB -> (H, W) int64 segment ids, ``id = R + 256 G + 256^2 B``."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] < 3:
        raise ValueError(f"rgb2id expects an (H, W, 3) array; got shape {color.shape}")
    c = color[..., :3].astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) segment ids in [0, 256^3) -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(id_map).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= PANOPTIC_ID_LIMIT):
        raise ValueError(f"segment ids must lie in [0, {PANOPTIC_ID_LIMIT}); got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _get(metadata: Any, key: str) -> Any:
    if metadata is None:
        return None
    return metadata.get(key) if hasattr(metadata, "get") else getattr(metadata, key, None)


def category_table(metadata: Any, kind: str) -> Dict[int, int]:
    """``{dataset id: contiguous id}`` of ``kind`` "thing" or "stuff" from a metadata object or
    dict; empty when the metadata has no such table."""
    if kind not in ("thing", "stuff"):
        raise ValueError(f"kind must be 'thing' or 'stuff', got {kind!r}")
    table = _get(metadata, f"{kind}_dataset_id_to_contiguous_id")
    return {int(k): int(v) for k, v in (table or {}).items()}


def contiguous_to_dataset(metadata: Any, kind: str) -> Dict[int, int]:
    """``{contiguous id: dataset id}``: the inverse of :func:`category_table`."""
    return {c: d for d, c in category_table(metadata, kind).items()}
