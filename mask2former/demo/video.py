"""Video and webcam input, annotated video output, and progress reporting.

* :func:`open_video` / :func:`open_webcam`: an opened ``cv2.VideoCapture`` or a clear error;
  :func:`read_frames` yields its (H, W, 3) uint8 BGR frames one at a time.
* :func:`open_video_writer`: a ``cv2.VideoWriter`` with the first codec of
  :data:`VIDEO_CODECS` (avc1, x264, mp4v) that this OpenCV build can encode.
* :class:`Progress`: frames done and frames/s, as a tqdm bar or a periodic log line.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

try:
    from tqdm import tqdm
except ImportError:  # progress is then logged periodically
    tqdm = None

__all__ = ["VIDEO_CODECS", "open_video", "open_webcam", "read_frames", "capture_fps", "open_video_writer",
           "Progress"]

logger = logging.getLogger("mask2former.demo")

# Tried in order; OpenCV wheels usually lack an H.264 encoder, mp4v (MPEG-4 part 2) is built in.
VIDEO_CODECS = ("avc1", "x264", "mp4v")


def open_video(path: str):
    """An opened ``cv2.VideoCapture`` of a video file; OSError naming the file otherwise."""
    if not os.path.isfile(path):
        raise OSError(f"video file not found: {path!r}")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise OSError(f"cannot open video {path!r}: not a video, or in a format this OpenCV build cannot decode")
    return capture


def open_webcam(index: int = 0):
    """An opened ``cv2.VideoCapture`` of camera ``index``; OSError when there is none."""
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        raise OSError(f"cannot open the webcam (camera {index}): none is connected, or it is in use")
    return capture


def read_frames(capture) -> Iterator[np.ndarray]:
    """The BGR frames of an opened ``cv2.VideoCapture``, one at a time."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def capture_fps(capture, default: float = 30.0) -> float:
    """The frame rate a capture reports, or ``default`` when it reports none (webcams, some files)."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if fps and np.isfinite(fps) and fps > 0 else default


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
