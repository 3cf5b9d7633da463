"""The demo's loops: images, a video or the webcam through a :class:`Predictor`, drawn with a
:class:`~mask2former.utils.visualizer.Visualizer`, saved or shown.

Each returns an exit status: 0 when at least one image (or frame) was processed, else 1.
Images that cannot be read or written are reported and skipped; frames are streamed in batches of
``batch_size``, so memory does not grow with the length of a video.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

import cv2
import numpy as np

from ..evaluation.files import write_image
from ..utils.visualizer import Visualizer, pick_output
from .display import show
from .export import PredictionExporter
from .inputs import batched, expand_inputs, is_image_file_name, output_paths, readable_images, video_output_path
from .predictor import Predictor
from .video import Progress, capture_fps, open_video_writer, read_frames

__all__ = ["draw", "describe", "run_images", "run_stream", "run_video", "run_webcam"]

logger = logging.getLogger("mask2former.demo")


def describe(predictions: dict, key: Optional[str], confidence_threshold: float) -> str:
    """A short summary of one prediction's ``key`` output, e.g. "12 segments"."""
    if key == "panoptic_seg":
        return f"{len(predictions['panoptic_seg'][1])} segments"
    if key == "instances":
        n = int((predictions["instances"].scores > confidence_threshold).sum())
        return f"{n} instances"
    if key == "sem_seg":
        return f"{int(predictions['sem_seg'].argmax(0).unique().numel())} classes"
    return "no predictions"


def draw(visualizer: Visualizer, image_bgr: np.ndarray, predictions: dict, task: Optional[str]) -> np.ndarray:
    """The BGR visualisation of one prediction."""
    vis_rgb = visualizer.draw_predictions(image_bgr[:, :, ::-1], predictions, task)
    return np.ascontiguousarray(vis_rgb[:, :, ::-1])


def run_images(predictor: Predictor, visualizer: Visualizer, patterns: Sequence[str], output: Optional[str] = None,
               *, batch_size: int = 1, task: Optional[str] = None, confidence_threshold: float = 0.5,
               save_json: bool = False) -> int:
    """Draw the predictions of the images named by ``patterns`` (see
    :func:`~mask2former.demo.inputs.expand_inputs`) into ``output`` (see
    :func:`~mask2former.demo.inputs.output_paths`), or show them without ``output``. With
    ``save_json`` the predictions are also exported (:class:`PredictionExporter`) next to them."""
    inputs = expand_inputs(patterns)
    if not inputs:
        logger.error("no input images")
        return 1
    if output and len(inputs) > 1 and is_image_file_name(output):
        logger.error("--output %r names one image file but %d images were found; give a folder",
                     output, len(inputs))
        return 1
    out_paths = output_paths(output, inputs) if output else [None] * len(inputs)
    exporter = None
    if save_json:
        json_root = os.path.dirname(output) if is_image_file_name(output) else output
        num_classes = predictor.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        exporter = PredictionExporter(json_root or ".", predictor.metadata, num_classes)

    done, skipped = 0, []
    for batch in batched(readable_images(inputs, out_paths, skipped), batch_size):
        start = time.perf_counter()
        outputs = predictor.predict_batch([image for _, _, image in batch], input_format="BGR")
        seconds = (time.perf_counter() - start) / len(batch)
        for (path, out_path, image), predictions in zip(batch, outputs):
            vis = draw(visualizer, image, predictions, task)
            summary = describe(predictions, pick_output(predictions, task), confidence_threshold)
            if out_path is None:
                logger.info("%s: %s in %.2fs", path, summary, seconds)
                done += 1
                if not show(vis, 0):
                    return 0
                continue
            try:
                write_image(out_path, vis)
            except OSError as e:
                logger.error("skipping %s: %s", path, e)
                skipped.append(path)
                continue
            if exporter is not None:
                exporter.add(os.path.splitext(os.path.basename(out_path))[0], predictions, task)
            done += 1
            logger.info("%s: %s in %.2fs -> %s", path, summary, seconds, out_path)
    if exporter is not None:
        for path in exporter.close():
            logger.info("predictions saved to %s", path)
    logger.info("%d of %d images processed%s", done, len(inputs),
                f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else "")
    return 0 if done else 1


def run_stream(predictor: Predictor, visualizer: Visualizer, capture, name: str, out_path: Optional[str] = None,
               *, batch_size: int = 1, task: Optional[str] = None) -> int:
    """Annotate every frame of ``capture`` (released at the end) in batches of ``batch_size``;
    write them to ``out_path`` (an mp4, opened on the first frame) or show them."""
    fps = capture_fps(capture)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    progress = Progress(total if total > 0 else None, name)
    writer = None
    try:
        for frames in batched(read_frames(capture), batch_size):
            outputs = predictor.predict_batch(frames, input_format="BGR")
            for frame, predictions in zip(frames, outputs):
                vis = draw(visualizer, frame, predictions, task)
                progress.update(1)
                if out_path is None:
                    if not show(vis, 1):
                        return 0
                    continue
                if writer is None:
                    writer = open_video_writer(out_path, fps, (vis.shape[1], vis.shape[0]))
                writer.write(vis)
    finally:
        progress.close()
        if writer is not None:
            writer.release()
        capture.release()
    if progress.count == 0:
        logger.error("no frame could be decoded from %s", name)
        return 1
    logger.info("%s: %d frames in %.1fs (%.2f frames/s)%s", name, progress.count,
                time.perf_counter() - progress.start, progress.fps(), f" -> {out_path}" if out_path else "")
    return 0


def run_video(predictor: Predictor, visualizer: Visualizer, capture, path: str, output: Optional[str] = None,
              *, batch_size: int = 1, task: Optional[str] = None) -> int:
    """:func:`run_stream` of the video file ``path`` (opened as ``capture``) into
    :func:`~mask2former.demo.inputs.video_output_path` of ``output``, or shown without it."""
    out_path = video_output_path(output, path) if output else None
    if out_path is not None and os.path.exists(out_path) and os.path.samefile(path, out_path):
        capture.release()
        logger.error("--output %r is the input video; give another path", out_path)
        return 1
    return run_stream(predictor, visualizer, capture, path, out_path, batch_size=batch_size, task=task)


def run_webcam(predictor: Predictor, visualizer: Visualizer, capture, output: Optional[str] = None,
               *, batch_size: int = 1, task: Optional[str] = None) -> int:
    """:func:`run_stream` of the webcam until Ctrl+C (or Esc / q in the window)."""
    out_path = video_output_path(output, "webcam") if output else None
    logger.info("reading the webcam; %s",
                "press Ctrl+C to stop" if out_path else "press Esc or q in the window to stop")
    try:
        return run_stream(predictor, visualizer, capture, "webcam", out_path, batch_size=batch_size, task=task)
    except KeyboardInterrupt:
        return 0
