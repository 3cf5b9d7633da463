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
installing the package.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import time
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import cv2
import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout: make the repository root importable
    sys.path.insert(0, _REPO_ROOT)

from mask2former import get_cfg  # noqa: E402
from mask2former.data.image_io import read_image_8bit  # noqa: E402
from mask2former.engine import Predictor  # noqa: E402
from mask2former.engine.defaults import register_custom_datasets  # noqa: E402
from mask2former.evaluation.instance_evaluation import instances_to_coco_json  # noqa: E402
from mask2former.evaluation.panoptic_evaluation import id2rgb  # noqa: E402
from mask2former.utils.visualizer import TASK_OUTPUTS, Visualizer, pick_output  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress is then logged periodically
    tqdm = None

logger = logging.getLogger("mask2former.demo")
T = TypeVar("T")

DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
WINDOW_NAME = "Mask2Former"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov")
# Tried in order; OpenCV wheels usually lack an H.264 encoder, mp4v (MPEG-4 part 2) is built in.
VIDEO_CODECS = ("avc1", "x264", "mp4v")
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
                             "whichever the model produces); switched on in the config if off")
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


def no_display_reason() -> str:
    """Why results cannot be shown in a window ("" when they can)."""
    if re.search(r"^\s*GUI:\s*NONE\s*$", cv2.getBuildInformation(), re.MULTILINE):
        return "this OpenCV build has no GUI support"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "$DISPLAY is not set"
    return ""


def display_available() -> bool:
    return not no_display_reason()


def is_image_file_name(path: str) -> bool:
    return not os.path.isdir(path) and path.lower().endswith(_IMAGE_EXTS)


def setup_cfg(args: argparse.Namespace):
    """The frozen config of ``args`` (the datasets it names must be registered: ``--datasets``
    files are, by :func:`main`). ``--task`` switches its output on when the config has it off."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    if args.task:
        key = _TASK_ON_KEY[args.task]
        if not cfg.MODEL.MASK_FORMER.TEST[key]:
            logger.info("--task %s: setting MODEL.MASK_FORMER.TEST.%s True", args.task, key)
            cfg.MODEL.MASK_FORMER.TEST[key] = True
    cfg.freeze()
    return cfg


# ----------------------------------------------------------------------------- images
def batched(items: Iterable[T], size: int) -> Iterator[List[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    batch: List[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Paths named by ``patterns``: glob patterns expanded (sorted), folders replaced by the image
    files directly in them (sorted), duplicates dropped. A plain path that does not exist is kept,
    so that it is reported as unreadable."""
    paths: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                           if n.lower().endswith(_IMAGE_EXTS) and os.path.isfile(os.path.join(pattern, n)))
            if not found:
                logger.warning("no image file (%s) in folder %r", "/".join(_IMAGE_EXTS), pattern)
            paths.extend(found)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                logger.warning("no file matches %r", pattern)
            paths.extend(m for m in matches if not os.path.isdir(m))
        else:
            paths.append(pattern)
    return list(dict.fromkeys(paths))


def read_image(path: str) -> np.ndarray:
    """An (H, W, 3) uint8 BGR image, upright (see mask2former.data.image_io.read_image_8bit)."""
    return read_image_8bit(path, "BGR")


def output_paths(output: str, inputs: Sequence[str]) -> List[str]:
    """Where each input's visualisation goes: ``output`` itself for a single input when it names an
    image file, else ``output/<base name>.png`` (``_1``, ``_2`` ... appended on name clashes)."""
    if len(inputs) == 1 and is_image_file_name(output):
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


def describe(predictions: dict, key: Optional[str], confidence_threshold: float) -> str:
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


# ----------------------------------------------------------------------------- --save-json
class JsonWriter:
    """Saves predictions in the COCO formats, category ids mapped back to the dataset's.

    Under ``root``: ``panoptic/<name>.png`` (segment ids as ``R + 256 G + 256^2 B``) and
    ``panoptic.json`` (``{"annotations": [{"image_id", "file_name", "segments_info"}],
    "categories"}``); ``instances.json`` (COCO result list with RLE ``segmentation``); and
    ``sem_seg/<name>.png`` (per-pixel contiguous class index of ``stuff_classes``, uint8, or uint16
    beyond 256 classes). ``image_id`` is the image's base name. The JSON files are written by
    :meth:`close`.
    """

    def __init__(self, root: str, metadata, num_classes: int):
        self.root = root
        self.metadata = metadata
        self.num_classes = int(num_classes)
        get = metadata.get
        self.thing_c2d = {int(c): d for d, c in (get("thing_dataset_id_to_contiguous_id") or {}).items()}
        self.stuff_c2d = {int(c): d for d, c in (get("stuff_dataset_id_to_contiguous_id") or {}).items()}
        self.panoptic: List[dict] = []
        self.instances: List[dict] = []
        self._unmapped: set = set()

    def dataset_id(self, contiguous_id: int, isthing: bool) -> int:
        """The dataset category id of a contiguous class (itself when the metadata has no table)."""
        tables = (self.thing_c2d, self.stuff_c2d) if isthing else (self.stuff_c2d, self.thing_c2d)
        for table in tables:
            if contiguous_id in table:
                return int(table[contiguous_id])
        if (self.thing_c2d or self.stuff_c2d) and contiguous_id not in self._unmapped:
            self._unmapped.add(contiguous_id)
            logger.warning("class %d is in neither dataset_id_to_contiguous_id table of %r; saved as is",
                           contiguous_id, self.metadata.get("name", "?"))
        return int(contiguous_id)

    def add(self, name: str, predictions: dict, task: Optional[str]) -> List[str]:
        """Save the outputs of one image (only that of ``task`` when given). Returns the files written."""
        keys = [pick_output(predictions, task)] if task else [k for k in TASK_OUTPUTS.values() if k in predictions]
        written = []
        if "panoptic_seg" in keys:
            written.append(self._add_panoptic(name, *predictions["panoptic_seg"]))
        if "instances" in keys:
            records = instances_to_coco_json(predictions["instances"], name, with_bbox=True)
            for r in records:
                r["category_id"] = self.dataset_id(int(r["category_id"]), True)
            self.instances.extend(records)
        if "sem_seg" in keys:
            labels = predictions["sem_seg"].argmax(0).cpu().numpy()
            path = os.path.join(self.root, "sem_seg", name + ".png")
            written.append(_write_png(path, labels.astype(np.uint8 if self.num_classes <= 256 else np.uint16)))
        return written

    def _add_panoptic(self, name: str, seg, segments_info: Sequence[dict]) -> str:
        seg = seg.cpu().numpy() if hasattr(seg, "cpu") else np.asarray(seg)
        path = _write_png(os.path.join(self.root, "panoptic", name + ".png"),
                          np.ascontiguousarray(id2rgb(seg)[:, :, ::-1]))
        infos = []
        for s in segments_info:
            ys, xs = np.nonzero(seg == int(s["id"]))
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] \
                if len(xs) else [0, 0, 0, 0]
            isthing = bool(s.get("isthing", True))
            infos.append({"id": int(s["id"]), "category_id": self.dataset_id(int(s["category_id"]), isthing),
                          "isthing": isthing, "area": int(len(xs)), "bbox": box, "iscrowd": 0})
        self.panoptic.append({"image_id": name, "file_name": name + ".png", "segments_info": infos})
        return path

    def categories(self) -> List[dict]:
        names = list(self.metadata.get("stuff_classes") or self.metadata.get("thing_classes") or [])
        # without a thing table the model treats every class as a thing
        things = set(self.thing_c2d) if self.thing_c2d else set(range(self.num_classes))
        return [{"id": self.dataset_id(c, c in things), "name": names[c] if c < len(names) else f"class {c}",
                 "isthing": int(c in things)} for c in range(self.num_classes)]

    def close(self) -> List[str]:
        written = []
        if self.panoptic:
            written.append(_write_json(os.path.join(self.root, "panoptic.json"),
                                       {"annotations": self.panoptic, "categories": self.categories()}))
        if self.instances:
            written.append(_write_json(os.path.join(self.root, "instances.json"), self.instances))
        return written


def _write_png(path: str, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path!r}")
    return path


def _write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


# ----------------------------------------------------------------------------- windows
def show(image_bgr: np.ndarray, wait_ms: int) -> bool:
    """Show an image in the demo window; False when the user pressed Esc or q."""
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW_NAME, image_bgr)
        key = cv2.waitKey(wait_ms)
    except cv2.error as e:
        raise RuntimeError(f"cannot open a window to show the results ({e.msg.strip()}); give --output PATH") from None
    return key not in (27, ord("q"))


def _readable_images(inputs: Sequence[str], out_paths: Sequence[Optional[str]],
                     skipped: List[str]) -> Iterator[Tuple[str, Optional[str], np.ndarray]]:
    """(path, output path, BGR image) of each input that can be read; the others are reported and
    appended to ``skipped``."""
    for path, out_path in zip(inputs, out_paths):
        if out_path is not None and os.path.exists(out_path) and os.path.samefile(path, out_path):
            logger.error("skipping %s: its visualisation would overwrite it; give another --output", path)
            skipped.append(path)
            continue
        try:
            image = read_image(path)
        except OSError as e:
            logger.error("skipping %s: %s", path, e)
            skipped.append(path)
            continue
        yield path, out_path, image


def run_images(args: argparse.Namespace, predictor: Predictor, visualizer: Visualizer) -> int:
    inputs = expand_inputs(args.input)
    if not inputs:
        logger.error("no input images")
        return 1
    if args.output and len(inputs) > 1 and is_image_file_name(args.output):
        logger.error("--output %r names one image file but %d images were found; give a folder",
                     args.output, len(inputs))
        return 1
    out_paths = output_paths(args.output, inputs) if args.output else [None] * len(inputs)
    json_writer = None
    if args.save_json:
        json_root = os.path.dirname(args.output) if is_image_file_name(args.output) else args.output
        json_writer = JsonWriter(json_root or ".", predictor.metadata, predictor.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    done, skipped = 0, []
    for batch in batched(_readable_images(inputs, out_paths, skipped), args.batch_size):
        start = time.perf_counter()
        outputs = predictor.predict_batch([image for _, _, image in batch], input_format="BGR")
        seconds = (time.perf_counter() - start) / len(batch)
        for (path, out_path, image), predictions in zip(batch, outputs):
            vis = draw(visualizer, image, predictions, args.task)
            summary = describe(predictions, pick_output(predictions, args.task), args.confidence_threshold)
            if out_path is None:
                logger.info("%s: %s in %.2fs", path, summary, seconds)
                done += 1
                if not show(vis, 0):
                    return 0
                continue
            try:
                _write_png(out_path, vis)
            except OSError as e:
                logger.error("skipping %s: %s", path, e)
                skipped.append(path)
                continue
            if json_writer is not None:
                json_writer.add(os.path.splitext(os.path.basename(out_path))[0], predictions, args.task)
            done += 1
            logger.info("%s: %s in %.2fs -> %s", path, summary, seconds, out_path)
    if json_writer is not None:
        for path in json_writer.close():
            logger.info("predictions saved to %s", path)
    logger.info("%d of %d images processed%s", done, len(inputs),
                f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else "")
    return 0 if done else 1


# ----------------------------------------------------------------------------- video
class _QuietStderr:
    """Sends file descriptor 2 to /dev/null meanwhile: OpenCV and FFmpeg print errors for every
    codec that is not available, which is expected while probing."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def open_video_writer(path: str, fps: float, size: Tuple[int, int], codecs: Sequence[str] = VIDEO_CODECS):
    """A ``cv2.VideoWriter`` for ``size`` = (width, height) frames with the first codec of
    ``codecs`` that works; RuntimeError naming the file and codecs when none does."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for codec in codecs:
        with _QuietStderr():
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), float(fps), tuple(size))
        if writer.isOpened():
            logger.info("writing %s (codec %s, %.3g frames/s, %dx%d)", path, codec, fps, size[0], size[1])
            return writer
        writer.release()
        logger.debug("codec %s is not available", codec)
    if os.path.exists(path) and os.path.getsize(path) == 0:
        os.remove(path)
    raise RuntimeError(f"cannot write video {path!r}: none of the codecs {', '.join(codecs)} works with this "
                       "OpenCV build (install an OpenCV with FFmpeg support)")


def read_frames(capture) -> Iterator[np.ndarray]:
    """The BGR frames of an opened ``cv2.VideoCapture``, one at a time."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


class Progress:
    """Frames done and frames/s: a tqdm bar when tqdm is installed, else a log line every
    ``every_s`` seconds."""

    def __init__(self, total: Optional[int], desc: str, every_s: float = 5.0, use_tqdm: Optional[bool] = None):
        use_tqdm = tqdm is not None if use_tqdm is None else use_tqdm
        self.bar = tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True) if use_tqdm else None
        self.total, self.desc, self.every_s = total, desc, every_s
        self.count = 0
        self.start = self.last = time.perf_counter()

    def fps(self) -> float:
        return self.count / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            logger.info("%s: %d%s frames, %.2f frames/s", self.desc, self.count,
                        f"/{self.total}" if self.total else "", self.fps())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def video_output_path(output: str, source_name: str) -> str:
    """``output`` when it names a video file, else ``output/<source base name>.mp4``."""
    if not os.path.isdir(output) and output.lower().endswith(_VIDEO_EXTS):
        return output
    return os.path.join(output, os.path.splitext(os.path.basename(source_name))[0] + ".mp4")


def run_stream(args: argparse.Namespace, predictor: Predictor, visualizer: Visualizer, capture,
               name: str, out_path: Optional[str]) -> int:
    """Annotate every frame of ``capture`` in batches of ``--batch-size``; write them to
    ``out_path`` (an mp4, opened on the first frame) or show them. Only one batch of frames is held
    at a time, so memory does not grow with the length of the stream."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and np.isfinite(fps) and fps > 0 else 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    progress = Progress(total if total > 0 else None, name)
    writer = None
    try:
        for frames in batched(read_frames(capture), args.batch_size):
            outputs = predictor.predict_batch(frames, input_format="BGR")
            for frame, predictions in zip(frames, outputs):
                vis = draw(visualizer, frame, predictions, args.task)
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


def open_video(path: str):
    """An opened ``cv2.VideoCapture`` of a video file; OSError naming the file otherwise."""
    if not os.path.isfile(path):
        raise OSError(f"video file not found: {path!r}")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise OSError(f"cannot open video {path!r}: not a video, or in a format this OpenCV build cannot decode")
    return capture


def run_video(args: argparse.Namespace, predictor: Predictor, visualizer: Visualizer, capture) -> int:
    path = args.video_input
    out_path = video_output_path(args.output, path) if args.output else None
    if out_path is not None and os.path.exists(out_path) and os.path.samefile(path, out_path):
        capture.release()
        logger.error("--output %r is the input video; give another path", out_path)
        return 1
    return run_stream(args, predictor, visualizer, capture, path, out_path)


def run_webcam(args: argparse.Namespace, predictor: Predictor, visualizer: Visualizer, capture) -> int:
    out_path = video_output_path(args.output, "webcam") if args.output else None
    logger.info("reading the webcam; %s", "press Ctrl+C to stop" if out_path else "press Esc or q in the window to stop")
    try:
        return run_stream(args, predictor, visualizer, capture, "webcam", out_path)
    except KeyboardInterrupt:
        return 0


# ----------------------------------------------------------------------------- main
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
    if args.video_input:
        try:
            capture = open_video(args.video_input)
        except OSError as e:
            logger.error("%s", e)
            return 1
    elif args.webcam:
        capture = cv2.VideoCapture(0)
        if not capture.isOpened():
            logger.error("cannot open the webcam (camera 0): none is connected, or it is in use")
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
    try:
        if args.input:
            return run_images(args, predictor, visualizer)
        if args.video_input:
            return run_video(args, predictor, visualizer, capture)
        return run_webcam(args, predictor, visualizer, capture)
    except RuntimeError as e:
        logger.error("%s", e)
        return 1
    finally:
        if not args.output and display_available():
            cv2.destroyAllWindows()


if __name__ == "__main__":
    sys.exit(main())
