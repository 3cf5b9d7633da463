#!/usr/bin/env python
"""Run a Mask2Former model on images, a video or a webcam and draw its predictions.

    python demo/demo.py --config-file CONFIG --input photos/*.jpg photos_dir/ --output vis/ \\
        [--save-json] --opts MODEL.WEIGHTS model_final.pkl
    python demo/demo.py --config-file CONFIG --video-input clip.mp4 --output vis/ --opts MODEL.WEIGHTS ...
    python demo/demo.py --config-file CONFIG --webcam --opts MODEL.WEIGHTS ...

Images: one ``<input base name>.png`` with the input's size per readable input, in the
``--output`` folder (or the ``--output`` file when there is a single input and it names an image
file); without ``--output`` they are shown in a window. Unreadable inputs are reported and
skipped. Videos (and the webcam, with ``--output``) are written as an annotated mp4 frame by frame.
``TEST.AUG.ENABLED True`` in ``--opts`` turns on test-time augmentation. The exit status is 0
when at least one image (or frame) was processed, else 1. Works from a checkout without
installing the package. This file is the command line only; the work is done by
:mod:`mask2former.demo` (predictor, input expansion, video, exporters, the loops).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout: make the repository root importable
    sys.path.insert(0, _REPO_ROOT)

from mask2former import get_cfg  # noqa: E402
from mask2former.demo import (  # noqa: E402
    Predictor,
    close_windows,
    display_available,
    is_image_file_name,
    no_display_reason,
    open_video,
    open_webcam,
    run_images,
    run_video,
    run_webcam,
)
from mask2former.engine.defaults import register_custom_datasets  # noqa: E402
from mask2former.evaluation.selection import switch_task_on  # noqa: E402
from mask2former.utils.visualizer import TASK_OUTPUTS, Visualizer  # noqa: E402

logger = logging.getLogger("mask2former.demo")

DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
_TASK_ON_KEY = {"panoptic": "PANOPTIC_ON", "instance": "INSTANCE_ON", "semantic": "SEMANTIC_ON"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Mask2Former demo: draw predictions over images, a video or a webcam.")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="path to a config file")
    parser.add_argument("--webcam", action="store_true", help="take inputs from the webcam (camera 0)")
    parser.add_argument("--video-input", metavar="FILE", help="path to a video file")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="image paths, folders (their images) or glob patterns, e.g. 'directory/*.jpg'")
    parser.add_argument("--output", metavar="PATH",
                        help="folder for the outputs, or a file name for a single image or a video; "
                             "without it the results are shown in a window")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score for instance predictions to be shown")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="images or video frames per model call")
    parser.add_argument("--task", choices=sorted(TASK_OUTPUTS),
                        help="output to draw and save (default: panoptic, else instance, else semantic, "
                             "whichever the model produces); switched on in the config if off "
                             "(MODEL.MASK_FORMER.TEST.*_ON, MODEL.KMAX_DEEPLAB.TEST.*_ON for kMaX-DeepLab)")
    parser.add_argument("--save-json", action="store_true",
                        help="also save the predictions of images: panoptic/ PNGs + panoptic.json (COCO "
                             "panoptic), instances.json (COCO results, RLE masks), sem_seg/ label PNGs")
    parser.add_argument("--datasets", action="append", default=[], metavar="YAML",
                        help="YAML file of custom datasets to register, as for train_net.py (repeatable)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pkl")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit status 2) for inconsistent arguments."""
    sources = [name for name, given in (("--input", args.input), ("--video-input", args.video_input),
                                        ("--webcam", args.webcam)) if given]
    if len(sources) != 1:
        parser.error("give exactly one of --input, --video-input and --webcam"
                     + (f" (got {', '.join(sources)})" if sources else ""))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1; got {args.batch_size}")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must lie in [0, 1]; got {args.confidence_threshold}")
    if args.save_json and not args.input:
        parser.error("--save-json saves the predictions of --input images only")
    if args.save_json and not args.output:
        parser.error("--save-json needs --output (the folder to write the predictions to)")
    if not args.output and not display_available():
        parser.error(f"no --output given and no display to show the results in ({no_display_reason()}); "
                     "give --output PATH to save them")
    if args.output and args.input and len(args.input) > 1 and is_image_file_name(args.output):
        parser.error(f"--output {args.output!r} names one image file but there are several inputs; give a folder")


def setup_cfg(args: argparse.Namespace):
    """The frozen config of ``args`` (the datasets it names must be registered: ``--datasets``
    files are, by :func:`main`). ``--task`` switches its output on when the config has it off."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    if args.task:
        key = switch_task_on(cfg, _TASK_ON_KEY[args.task])  # MODEL.KMAX_DEEPLAB.TEST for kMaX-DeepLab
        if key is not None:
            logger.info("--task %s: setting %s True", args.task, key)
    cfg.freeze()
    return cfg


def _release(capture, status: int) -> int:
    if capture is not None:
        capture.release()
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(levelname)s: %(message)s")
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logger.info("Arguments: %s", args)
    # the video source is checked before the (slow) model set-up
    capture = None
    try:
        if args.video_input:
            capture = open_video(args.video_input)
        elif args.webcam:
            capture = open_webcam(0)
    except OSError as e:
        logger.error("%s", e)
        return 1
    try:
        register_custom_datasets(args.datasets)
    except (OSError, ValueError) as e:
        logger.error("cannot register the datasets of --datasets: %s", e)
        return _release(capture, 1)
    try:
        cfg = setup_cfg(args)
        predictor = Predictor(cfg)
    except (OSError, ValueError, KeyError) as e:
        logger.error("cannot set up the model: %s", e)
        return _release(capture, 1)
    if predictor.tta is not None:
        logger.info("test-time augmentation: scales %s, max size %d, flip %s", predictor.tta.min_sizes,
                    predictor.tta.max_size, predictor.tta.flip)
    visualizer = Visualizer(predictor.metadata, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                            confidence_threshold=args.confidence_threshold)
    stream = dict(batch_size=args.batch_size, task=args.task)
    try:
        if args.input:
            return run_images(predictor, visualizer, args.input, args.output, save_json=args.save_json,
                              confidence_threshold=args.confidence_threshold, **stream)
        if args.video_input:
            return run_video(predictor, visualizer, capture, args.video_input, args.output, **stream)
        return run_webcam(predictor, visualizer, capture, args.output, **stream)
    except RuntimeError as e:
        logger.error("%s", e)
        return 1
    finally:
        if not args.output and display_available():
            close_windows()


if __name__ == "__main__":
    sys.exit(main())
