"""Inference engine: :class:`Predictor` runs a configured model on single images."""
from .predictor import Predictor, resize_image, resize_shortest_edge

__all__ = ["Predictor", "resize_image", "resize_shortest_edge"]
