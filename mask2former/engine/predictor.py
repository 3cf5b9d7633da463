"""Single-image inference with the official test-time preprocessing.

    cfg = mask2former.get_cfg(); cfg.merge_from_file(path); cfg.merge_from_list(opts)
    predictor = Predictor(cfg)
    outputs = predictor(image_hwc_uint8_bgr)            # or predictor(image_rgb, input_format="RGB")

The image is resized so that its short side is ``INPUT.MIN_SIZE_TEST`` and its long side at most
``INPUT.MAX_SIZE_TEST`` (bilinear, like Detectron2's test-time ``ResizeShortestEdge``), converted to
``INPUT.FORMAT`` channel order, and the model is asked for outputs at the original size.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

import numpy as np
import torch
from PIL import Image

from ..checkpoint import load_checkpoint
from ..data.catalog import Metadata, MetadataCatalog
from ..modeling import build_model

__all__ = ["Predictor", "resize_shortest_edge", "resize_image"]

logger = logging.getLogger(__name__)

_FORMATS = ("RGB", "BGR")


def resize_shortest_edge(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Output size ``(newh, neww)`` for resizing an ``h x w`` image so that its short side is
    ``short`` and its long side is at most ``max_size``.

    The scaled sizes are rounded half up (``int(x + 0.5)``). ``short <= 0`` means no resizing and
    ``max_size <= 0`` means no limit on the long side.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive; got {h}x{w}")
    if short <= 0:
        return int(h), int(w)
    scale = float(short) / min(h, w)
    newh, neww = h * scale, w * scale
    if max_size > 0 and max(newh, neww) > max_size:
        shrink = float(max_size) / max(newh, neww)
        newh, neww = newh * shrink, neww * shrink
    return int(newh + 0.5), int(neww + 0.5)


def resize_image(image: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """Bilinear resize of an ``(H, W, C)`` uint8 image (PIL, as Detectron2 does for uint8)."""
    if image.shape[:2] == (newh, neww):
        return image
    resized = Image.fromarray(image).resize((neww, newh), Image.BILINEAR)
    return np.asarray(resized)


def _check_format(fmt: str, what: str) -> str:
    fmt = str(fmt).upper()
    if fmt not in _FORMATS:
        raise ValueError(f"{what} must be one of {_FORMATS}; got {fmt!r}")
    return fmt


class Predictor:
    """Builds the model of ``cfg``, loads ``cfg.MODEL.WEIGHTS`` (random weights when empty) and runs
    it on one ``(H, W, 3)`` uint8 image at a time.

    Attributes: ``cfg`` (a frozen copy), ``model`` (eval mode), ``metadata`` (of
    ``cfg.DATASETS.TEST[0]``), ``input_format`` (``cfg.INPUT.FORMAT``).
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.input_format = _check_format(self.cfg.INPUT.FORMAT, "INPUT.FORMAT")
        self.min_size = int(self.cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(self.cfg.INPUT.MAX_SIZE_TEST)
        test_sets = list(self.cfg.DATASETS.TEST)
        self.metadata = MetadataCatalog.get(test_sets[0]) if test_sets else Metadata(name="__unused")

        weights = self.cfg.MODEL.WEIGHTS
        if weights and not os.path.isfile(weights):
            raise FileNotFoundError(
                f"MODEL.WEIGHTS file not found: {weights!r} (give an existing .pkl/.pth checkpoint, "
                f"or MODEL.WEIGHTS \"\" for random weights)")
        # The weights are loaded here (and required), never by build_model.
        build_cfg = self.cfg.clone()
        build_cfg.defrost()
        build_cfg.MODEL.WEIGHTS = ""
        self.model = build_model(build_cfg)
        self.model.eval()
        if weights:
            load_checkpoint(self.model, weights)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the model has random weights")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, image: np.ndarray, input_format: str = "BGR") -> Dict:
        """The model input for one image: resized, in ``INPUT.FORMAT`` order, CHW float tensor,
        with ``height``/``width`` set to the original size."""
        input_format = _check_format(input_format, "input_format")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image; got shape {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image; got {image.dtype}")
        h, w = image.shape[:2]
        if input_format != self.input_format:
            image = image[:, :, ::-1]
        newh, neww = resize_shortest_edge(h, w, self.min_size, self.max_size)
        image = resize_image(np.ascontiguousarray(image), newh, neww)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        return {"image": tensor, "height": h, "width": w}

    def __call__(self, image: np.ndarray, input_format: str = "BGR") -> Dict:
        """Run the model on one ``(H, W, 3)`` uint8 image given in ``input_format`` ("BGR", as read by
        OpenCV, or "RGB"). Returns the model's output dict (``sem_seg`` / ``panoptic_seg`` /
        ``instances``, as enabled in the config) at the image's original size."""
        inputs = self.preprocess(image, input_format)
        with torch.inference_mode():
            return self.model([inputs])[0]
