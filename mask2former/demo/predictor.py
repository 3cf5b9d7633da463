"""Inference on images with the official test-time preprocessing.

    cfg = mask2former.get_cfg(); cfg.merge_from_file(path); cfg.merge_from_list(opts)
    predictor = Predictor(cfg)
    outputs = predictor(image_hwc_uint8_bgr)            # or predictor(image_rgb, input_format="RGB")
    outputs = predictor.predict_batch([image1, image2])  # one model call, same results

The image is resized so that its short side is ``INPUT.MIN_SIZE_TEST`` and its long side at most
``INPUT.MAX_SIZE_TEST`` (bilinear, like Detectron2's test-time ``ResizeShortestEdge``), converted to
``INPUT.FORMAT`` channel order, and the model is asked for outputs at the original size. With
``TEST.AUG.ENABLED`` the test-time augmentation wrapper does the resizing instead.
``mask2former.engine.Predictor`` is the same class.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..data.catalog import Metadata, MetadataCatalog
from ..data.transforms import resize_image, resize_shortest_edge
from ..modeling import build_model
from ..modeling.test_time_augmentation import build_tta_model

__all__ = ["Predictor", "resize_shortest_edge", "resize_image"]

logger = logging.getLogger(__name__)

_FORMATS = ("RGB", "BGR")


def _check_format(fmt: str, what: str) -> str:
    fmt = str(fmt).upper()
    if fmt not in _FORMATS:
        raise ValueError(f"{what} must be one of {_FORMATS}; got {fmt!r}")
    return fmt


class Predictor:
    """Builds the model of ``cfg``, loads ``cfg.MODEL.WEIGHTS`` (random weights when empty) and runs
    it on ``(H, W, 3)`` uint8 images, one at a time (``__call__``) or in batches
    (:meth:`predict_batch`).

    With ``TEST.AUG.ENABLED`` the model runs under test-time augmentation
    (:class:`~mask2former.modeling.test_time_augmentation.MaskFormerWithTTA`: scales
    ``TEST.AUG.MIN_SIZES`` capped at ``TEST.AUG.MAX_SIZE``, plus flips with ``TEST.AUG.FLIP``)
    instead of the single ``INPUT.MIN_SIZE_TEST`` resize.

    Attributes: ``cfg`` (a frozen copy), ``model`` (eval mode), ``tta`` (the TTA wrapper or None),
    ``metadata`` (of ``cfg.DATASETS.TEST[0]``, else ``DATASETS.TRAIN[0]``), ``input_format``
    (``cfg.INPUT.FORMAT``).
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.input_format = _check_format(self.cfg.INPUT.FORMAT, "INPUT.FORMAT")
        self.min_size = int(self.cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(self.cfg.INPUT.MAX_SIZE_TEST)
        names = list(self.cfg.DATASETS.TEST[:1]) or list(self.cfg.DATASETS.TRAIN[:1])
        self.metadata = MetadataCatalog.get(names[0]) if names else Metadata(name="__unused")

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
        self.tta = build_tta_model(self.cfg, self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, image: np.ndarray, input_format: str = "BGR", resize: bool = True) -> Dict:
        """The model input for one image: in ``INPUT.FORMAT`` order, a (3, h, w) float tensor
        resized to the test size (kept at (H, W) with ``resize=False``, as TTA resizes itself),
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
        if resize:
            newh, neww = resize_shortest_edge(h, w, self.min_size, self.max_size)
            image = resize_image(np.ascontiguousarray(image), newh, neww)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        return {"image": tensor, "height": h, "width": w}

    def __call__(self, image: np.ndarray, input_format: str = "BGR") -> Dict:
        """Run the model on one ``(H, W, 3)`` uint8 image given in ``input_format`` ("BGR", as read by
        OpenCV, or "RGB"). Returns the model's output dict (``sem_seg`` / ``panoptic_seg`` /
        ``instances``, as enabled in the config) at the image's original size."""
        return self.predict_batch([image], input_format)[0]

    def predict_batch(self, images: Sequence[np.ndarray], input_format: str = "BGR") -> List[Dict]:
        """:meth:`__call__` for several images in one model call (images whose resized sizes pad to
        the same size share a forward pass; the results equal per-image calls)."""
        if len(images) == 0:
            return []
        inputs = [self.preprocess(im, input_format, resize=self.tta is None) for im in images]
        with torch.inference_mode():
            return (self.tta or self.model)(inputs)
