#!/usr/bin/env python
"""Run a Mask2Former model on images and save the predictions drawn over them.

    python demo/demo.py --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml \
        --input photos/*.jpg --output vis/ --opts MODEL.WEIGHTS model_final.pkl

One ``<input base name>.png`` is written per readable input into the ``--output`` folder (or to the
``--output`` file when there is a single input and it names an image file). Unreadable inputs are
reported and skipped. The exit status is 0 when at least one image was processed, else 1.
Works from a checkout without installing the package.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout: make the repository root importable
    sys.path.insert(0, _REPO_ROOT)

from mask2former import get_cfg  # noqa: E402
from mask2former.engine import Predictor  # noqa: E402
from mask2former.utils.visualizer import Visualizer  # noqa: E402

logger = logging.getLogger("mask2former.demo")

DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Mask2Former demo: draw predictions over images.")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="path to a config file")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="image paths or glob patterns, e.g. 'directory/*.jpg'")
    parser.add_argument("--output", metavar="PATH",
                        help="folder for the visualisations, or a file name when there is one input")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score for instance predictions to be drawn")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pkl")
    return parser


def setup_cfg(args: argparse.Namespace):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    cfg.freeze()
    return cfg


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Paths named by ``patterns`` (globs expanded, sorted), without duplicates. A pattern without
    glob characters is kept even if it does not exist, so that it is reported as unreadable."""
    paths: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                logger.warning("no file matches %r", pattern)
            paths.extend(m for m in matches if not os.path.isdir(m))
        else:
            paths.append(pattern)
    return list(dict.fromkeys(paths))


def read_image(path: str) -> np.ndarray:
    """An (H, W, 3) uint8 BGR image; raises OSError when the file cannot be read or decoded."""
    data = np.fromfile(path, dtype=np.uint8)  # OSError for missing/unreadable files
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise OSError(f"cannot decode {path!r} as an image")
    return image


def output_paths(output: str, inputs: Sequence[str]) -> List[str]:
    """Where each input's visualisation goes: ``output`` itself for a single input when it names an
    image file, else ``output/<base name>.png`` (``_1``, ``_2`` ... appended on name clashes)."""
    if len(inputs) == 1 and not os.path.isdir(output) and output.lower().endswith(_IMAGE_EXTS):
        return [output]
    used, paths = set(), []
    for path in inputs:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = stem, 0
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        paths.append(os.path.join(output, name + ".png"))
    return paths


def describe(predictions: dict, confidence_threshold: float) -> str:
    if "panoptic_seg" in predictions:
        return f"{len(predictions['panoptic_seg'][1])} segments"
    if "instances" in predictions:
        n = int((predictions["instances"].scores > confidence_threshold).sum())
        return f"{n} instances"
    if "sem_seg" in predictions:
        return f"{int(predictions['sem_seg'].argmax(0).unique().numel())} classes"
    return "no predictions"


def run_on_image(predictor: Predictor, visualizer: Visualizer, image_bgr: np.ndarray) -> Tuple[dict, np.ndarray]:
    """Predictions for one BGR image and their visualisation (BGR)."""
    predictions = predictor(image_bgr, input_format="BGR")
    vis_rgb = visualizer.draw_predictions(image_bgr[:, :, ::-1], predictions)
    return predictions, np.ascontiguousarray(vis_rgb[:, :, ::-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(levelname)s: %(message)s")
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.input:
        parser.error("--input is required")
    if not args.output:
        parser.error("--output is required (the visualisations are written to files)")
    logger.info("Arguments: %s", args)

    inputs = expand_inputs(args.input)
    if not inputs:
        logger.error("no input images")
        return 1
    if len(inputs) > 1 and args.output.lower().endswith(_IMAGE_EXTS) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output!r} names one image file but there are {len(inputs)} inputs; "
                     "give a folder")
    try:
        cfg = setup_cfg(args)
        predictor = Predictor(cfg)
    except (OSError, ValueError, KeyError) as e:
        logger.error("cannot set up the model: %s", e)
        return 1
    visualizer = Visualizer(predictor.metadata, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                            confidence_threshold=args.confidence_threshold)

    done = 0
    for path, out_path in zip(inputs, output_paths(args.output, inputs)):
        try:
            image = read_image(path)
        except OSError as e:
            logger.error("skipping %s: cannot read image (%s)", path, e)
            continue
        start = time.perf_counter()
        predictions, vis = run_on_image(predictor, visualizer, image)
        elapsed = time.perf_counter() - start
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        if not cv2.imwrite(out_path, vis):
            logger.error("could not write %s", out_path)
            continue
        done += 1
        logger.info("%s: %s in %.2fs -> %s", path, describe(predictions, args.confidence_threshold), elapsed,
                    out_path)
    logger.info("%d of %d images processed", done, len(inputs))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
