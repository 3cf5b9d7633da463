"""Showing results in a window (OpenCV HighGUI), and telling up front when that is impossible."""
from __future__ import annotations

import os
import re
import sys

import cv2
import numpy as np

__all__ = ["WINDOW_NAME", "no_display_reason", "display_available", "show", "close_windows"]

WINDOW_NAME = "Mask2Former"


def no_display_reason() -> str:
    """Why results cannot be shown in a window ("" when they can)."""
    if re.search(r"^\s*GUI:\s*NONE\s*$", cv2.getBuildInformation(), re.MULTILINE):
        return "this OpenCV build has no GUI support"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "$DISPLAY is not set"
    return ""


def display_available() -> bool:
    return not no_display_reason()


def show(image_bgr: np.ndarray, wait_ms: int) -> bool:
    """Show an image in the demo window; False when the user pressed Esc or q."""
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW_NAME, image_bgr)
        key = cv2.waitKey(wait_ms)
    except cv2.error as e:
        raise RuntimeError(f"cannot open a window to show the results ({e.msg.strip()}); give --output PATH") from None
    return key not in (27, ord("q"))


def close_windows() -> None:
    cv2.destroyAllWindows()
