"""Drawing Mask2Former predictions over an image with OpenCV and NumPy.

    vis = Visualizer(metadata, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    canvas_rgb = vis.draw_predictions(image_rgb, outputs)

Images are ``(H, W, 3)`` uint8 in RGB order (the order of the metadata colours); the drawing
functions return a new array and never modify their input. Masks are alpha-blended, outlined and
labelled with the class name (and score for instances). Class names and colours come from the
dataset metadata when it has them, else ``"class {id}"`` and a deterministic colour per class.
"""
from __future__ import annotations

import colorsys
from typing import Any, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["TASK_OUTPUTS", "Visualizer", "default_color", "pick_output"]

Color = Tuple[int, int, int]


def default_color(class_id: int) -> Color:
    """A deterministic, well-spread, fairly saturated RGB colour for a class id."""
    hue = (int(class_id) * 0.618033988749895) % 1.0
    sat = 0.65 + 0.3 * ((int(class_id) * 7 % 5) / 4.0)
    val = 0.75 + 0.2 * ((int(class_id) * 3 % 4) / 3.0)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _jitter(color: Color, key: int) -> Color:
    """A deterministic small variation of ``color`` so that instances of one class differ."""
    rng = np.random.default_rng(int(key) & 0xFFFFFFFF)
    delta = rng.uniform(-40, 40, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(color, np.float64) + delta, 0, 255))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


TASK_OUTPUTS = {"panoptic": "panoptic_seg", "instance": "instances", "semantic": "sem_seg"}


def pick_output(predictions: dict, task: Optional[str] = None) -> Optional[str]:
    """The key of the output to show: that of ``task`` (KeyError naming the available outputs
    when the predictions lack it), else the first present of panoptic_seg, instances, sem_seg
    (None when there is none)."""
    if task is not None:
        if task not in TASK_OUTPUTS:
            raise ValueError(f"task must be one of {sorted(TASK_OUTPUTS)}; got {task!r}")
        key = TASK_OUTPUTS[task]
        if key not in predictions:
            raise KeyError(f"the predictions have no {key!r} for task {task!r}; they have {sorted(predictions)}")
        return key
    return next((k for k in TASK_OUTPUTS.values() if k in predictions), None)


class Visualizer:
    """Draws panoptic, instance or semantic predictions.

    Args:
        metadata: dataset metadata (``Metadata`` or dict) with optional ``stuff_classes``,
            ``stuff_colors``, ``thing_classes``, ``thing_colors``; ``None`` for none.
        num_classes: the model's number of classes (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``). It picks
            which class table the predicted ids index: ``stuff_classes`` lists every class for
            panoptic and semantic datasets, ``thing_classes`` for instance-only datasets.
        alpha: mask opacity.
        confidence_threshold: instances with a score not above it are not drawn.
    """

    def __init__(self, metadata: Any = None, *, num_classes: Optional[int] = None, alpha: float = 0.5,
                 confidence_threshold: float = 0.5):
        self.alpha = float(alpha)
        self.confidence_threshold = float(confidence_threshold)
        self.names, self.colors = self._class_table(metadata, num_classes)

    # ------------------------------------------------------------------ class names / colours
    @staticmethod
    def _class_table(metadata: Any, num_classes: Optional[int]) -> Tuple[List[str], List[Optional[Sequence[int]]]]:
        get = (lambda k: None) if metadata is None else metadata.get
        tables = []
        for prefix in ("stuff", "thing"):
            names = get(prefix + "_classes")
            if names:
                colors = get(prefix + "_colors") or []
                tables.append((list(names), list(colors)))
        if not tables:
            return [], []
        chosen = tables[0]
        if num_classes is not None:
            chosen = next((t for t in tables if len(t[0]) == num_classes), chosen)
        names, colors = chosen
        colors = colors if len(colors) == len(names) else [None] * len(names)
        return names, colors

    def class_name(self, class_id: int) -> str:
        class_id = int(class_id)
        if 0 <= class_id < len(self.names):
            return str(self.names[class_id])
        return f"class {class_id}"

    def class_color(self, class_id: int) -> Color:
        class_id = int(class_id)
        if 0 <= class_id < len(self.colors) and self.colors[class_id] is not None:
            return tuple(int(c) for c in self.colors[class_id])[:3]
        return default_color(class_id)

    # ------------------------------------------------------------------ public drawing API
    def draw_predictions(self, image: np.ndarray, predictions: dict, task: Optional[str] = None) -> np.ndarray:
        """Draw the output of ``task`` ("panoptic", "instance" or "semantic"), or by default the
        most informative output present: panoptic, else instances, else semantic."""
        key = pick_output(predictions, task)
        if key == "panoptic_seg":
            seg, segments_info = predictions["panoptic_seg"]
            return self.draw_panoptic_seg(image, seg, segments_info)
        if key == "instances":
            return self.draw_instances(image, predictions["instances"])
        if key == "sem_seg":
            return self.draw_sem_seg(image, predictions["sem_seg"])
        return self._check_image(image).copy()

    def draw_panoptic_seg(self, image: np.ndarray, panoptic_seg: Any, segments_info: Sequence[dict]) -> np.ndarray:
        """``panoptic_seg``: (H, W) segment ids (0 = no segment); ``segments_info``: dicts with
        ``id``, ``category_id``, ``isthing``."""
        image = self._check_image(image)
        seg = self._check_map(_to_numpy(panoptic_seg), image, "panoptic_seg")
        regions = []
        for info in segments_info:
            mask = seg == int(info["id"])
            if not mask.any():
                continue
            cid = int(info["category_id"])
            color = self.class_color(cid)
            if info.get("isthing", False):
                color = _jitter(color, int(info["id"]))
            regions.append((mask, color, self.class_name(cid)))
        return self._draw_regions(image, regions)

    def draw_instances(self, image: np.ndarray, instances: Any) -> np.ndarray:
        """Draws instances whose score is above ``confidence_threshold``, larger masks first."""
        image = self._check_image(image)
        if len(instances) == 0:
            return image.copy()
        masks = _to_numpy(instances.pred_masks) > 0.5
        scores = _to_numpy(instances.scores).astype(np.float64)
        classes = _to_numpy(instances.pred_classes).astype(np.int64)
        if masks.shape[1:] != image.shape[:2]:
            raise ValueError(f"pred_masks have size {masks.shape[1:]}, the image {image.shape[:2]}")
        keep = np.nonzero(scores > self.confidence_threshold)[0]
        keep = sorted(keep, key=lambda i: -int(masks[i].sum()))
        regions = []
        for rank, i in enumerate(keep):
            if not masks[i].any():
                continue
            color = _jitter(self.class_color(classes[i]), rank + 1)
            regions.append((masks[i], color, f"{self.class_name(classes[i])} {scores[i] * 100:.0f}%"))
        return self._draw_regions(image, regions)

    def draw_sem_seg(self, image: np.ndarray, sem_seg: Any) -> np.ndarray:
        """``sem_seg``: (K, H, W) class scores (argmax is drawn) or (H, W) class ids."""
        image = self._check_image(image)
        sem = _to_numpy(sem_seg)
        labels = sem.argmax(axis=0) if sem.ndim == 3 else sem.astype(np.int64)
        labels = self._check_map(labels, image, "sem_seg")
        ids, counts = np.unique(labels, return_counts=True)
        regions = [(labels == c, self.class_color(c), self.class_name(c))
                   for c, _ in sorted(zip(ids, counts), key=lambda t: -t[1])]
        return self._draw_regions(image, regions)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_image(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image; got {image.shape} {image.dtype}")
        return image

    @staticmethod
    def _check_map(seg: np.ndarray, image: np.ndarray, what: str) -> np.ndarray:
        if seg.shape != image.shape[:2]:
            raise ValueError(f"{what} has size {seg.shape}, the image {image.shape[:2]}")
        return seg

    def _draw_regions(self, image: np.ndarray, regions: List[Tuple[np.ndarray, Color, str]]) -> np.ndarray:
        """Blend each (mask, colour, label) in order, then outline and label them on top."""
        h, w = image.shape[:2]
        canvas = image.astype(np.float32)
        for mask, color, _ in regions:
            canvas[mask] = canvas[mask] * (1.0 - self.alpha) + np.asarray(color, np.float32) * self.alpha
        out = np.ascontiguousarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))

        thickness = max(1, round(min(h, w) / 400))
        for mask, color, _ in regions:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            edge = tuple(int(c * 0.6) for c in color)
            cv2.drawContours(out, contours, -1, edge, thickness, lineType=cv2.LINE_AA)

        font_scale = max(0.35, min(h, w) / 900)
        for mask, color, label in regions:
            self._draw_label(out, mask, color, label, font_scale)
        return out

    @staticmethod
    def _draw_label(out: np.ndarray, mask: np.ndarray, color: Color, label: str, font_scale: float) -> None:
        """Write ``label`` centred on the mask pixel farthest from the mask's border; skip
        regions too thin to hold it."""
        padded = np.pad(mask.astype(np.uint8), 1)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
        if dist.max() < 3:
            return
        y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        font = cv2.FONT_HERSHEY_SIMPLEX
        (tw, th), base = cv2.getTextSize(label, font, font_scale, 1)
        h, w = out.shape[:2]
        x0 = int(np.clip(x - tw // 2, 0, max(0, w - tw - 2)))
        y0 = int(np.clip(y + th // 2, th + 2, max(th + 2, h - base - 2)))
        box = tuple(int(c * 0.45) for c in color)
        cv2.rectangle(out, (x0 - 1, y0 - th - 2), (x0 + tw + 1, y0 + base), box, thickness=-1)
        cv2.putText(out, label, (x0, y0), font, font_scale, (255, 255, 255), 1, lineType=cv2.LINE_AA)
