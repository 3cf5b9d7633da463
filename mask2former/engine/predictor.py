"""Alias: the :class:`Predictor` lives in :mod:`mask2former.demo.predictor` now."""
from ..demo.predictor import Predictor, resize_image, resize_shortest_edge  # noqa: F401

__all__ = ["Predictor", "resize_shortest_edge", "resize_image"]
