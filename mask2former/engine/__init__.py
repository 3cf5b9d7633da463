"""Inference (:class:`Predictor`) and training (:class:`Trainer`, command-line helpers)."""
from .defaults import default_argument_parser, default_setup, setup, setup_logger
from .predictor import Predictor, resize_image, resize_shortest_edge
from .trainer import Trainer

__all__ = [
    "Predictor",
    "Trainer",
    "default_argument_parser",
    "default_setup",
    "resize_image",
    "resize_shortest_edge",
    "setup",
    "setup_logger",
]
