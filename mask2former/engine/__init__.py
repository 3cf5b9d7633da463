"""Inference (:class:`Predictor`) and training: the loop and hook interface (train_loop.py:
:class:`TrainLoop`, :class:`HookBase`), the default hooks (hooks.py), the config-driven
:class:`Trainer` (trainer.py) and the command-line helpers (defaults.py)."""
from .defaults import default_argument_parser, default_setup, setup, setup_logger
from .predictor import Predictor, resize_image, resize_shortest_edge
from .train_loop import HookBase, TrainLoop
from .trainer import Trainer

__all__ = [
    "HookBase",
    "Predictor",
    "TrainLoop",
    "Trainer",
    "default_argument_parser",
    "default_setup",
    "resize_image",
    "resize_shortest_edge",
    "setup",
    "setup_logger",
]
