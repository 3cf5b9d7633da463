"""Conversions that turn downloaded benchmark archives into the layouts the loaders expect.

    python -m mask2former.data.prepare ade20k_sem_seg        [--root DIR] [--workers N]
    python -m mask2former.data.prepare coco_panoptic_semseg  [--root DIR] [--workers N]

``--root`` defaults to ``$DETECTRON2_DATASETS`` (else ``./datasets``). Existing outputs are
overwritten. See ``datasets/README.md`` for the other datasets, whose conversions need the
official tools (cityscapesscripts, panopticapi and the ADE20K instance archive).

* ``ade20k_sem_seg``: ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = "other",
  1..150 = classes) -> ``annotations_detectron2/...``: each label minus one, so that the classes
  are 0..149 and "other" becomes the ignore label 255.
* ``coco_panoptic_semseg``: ``coco/panoptic_{train,val}2017/*.png`` with
  ``coco/annotations/panoptic_{train,val}2017.json`` -> ``coco/panoptic_semseg_{train,val}2017/``:
  every pixel of a segment gets its category's contiguous id (0..132, the order of the COCO
  panoptic categories; crowd regions included), unlabeled pixels 255.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .datasets.builtin import datasets_root

__all__ = ["ade20k_label_to_detectron2", "convert_ade20k_sem_seg", "panoptic_to_semantic",
           "convert_coco_panoptic_semseg", "main"]


def ade20k_label_to_detectron2(label: np.ndarray) -> np.ndarray:
    """ADE20K label map (uint8, 0 = other) -> classes 0..149 with 255 for "other"."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f"ADE20K labels must be 8-bit; got {label.dtype}")
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255


def panoptic_to_semantic(pan_rgb: np.ndarray, segments: Iterable[dict],
                         id_map: Dict[int, int], ignore_label: int = 255) -> np.ndarray:
    """Semantic label map of a COCO panoptic PNG (H, W, 3): segment pixels get
    ``id_map[category_id]``, everything else ``ignore_label``."""
    rgb = np.asarray(pan_rgb).astype(np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    out = np.full(ids.shape, ignore_label, dtype=np.uint8)
    for seg in segments:
        cat = int(seg["category_id"])
        if cat not in id_map:
            raise ValueError(f"segment {seg.get('id')} has category_id {cat}, which is not in the "
                             "category table")
        out[ids == int(seg["id"])] = id_map[cat]
    return out


def _run(jobs: Sequence[Tuple[str, str]], fn: Callable[[str, str], None], workers: int,
         what: str) -> None:
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(lambda job: fn(*job), jobs):
            done += 1
            if done % 1000 == 0 or done == len(jobs):
                print(f"{what}: {done}/{len(jobs)}", flush=True)


def convert_ade20k_sem_seg(root: Optional[str] = None, workers: int = 4) -> List[str]:
    base = os.path.join(datasets_root(root), "ADEChallengeData2016")
    outputs = []
    for split in ("training", "validation"):
        src = os.path.join(base, "annotations", split)
        dst = os.path.join(base, "annotations_detectron2", split)
        if not os.path.isdir(src):
            raise FileNotFoundError(
                f"{src} not found: unpack ADEChallengeData2016.zip under {datasets_root(root)} "
                "(see datasets/README.md)")
        os.makedirs(dst, exist_ok=True)
        jobs = [(os.path.join(src, f), os.path.join(dst, f)) for f in sorted(os.listdir(src))
                if f.endswith(".png")]

        def convert(a: str, b: str) -> None:
            with Image.open(a) as im:
                Image.fromarray(ade20k_label_to_detectron2(np.asarray(im))).save(b)

        _run(jobs, convert, workers, f"ADE20K {split}")
        outputs.append(dst)
    return outputs


def convert_coco_panoptic_semseg(root: Optional[str] = None, workers: int = 4,
                                 splits: Sequence[str] = ("val2017", "train2017")) -> List[str]:
    from .catalog import MetadataCatalog

    base = os.path.join(datasets_root(root), "coco")
    table = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg").stuff_dataset_id_to_contiguous_id
    id_map = {int(k): int(v) for k, v in table.items()}
    outputs = []
    for split in splits:
        pan_json = os.path.join(base, "annotations", f"panoptic_{split}.json")
        pan_root = os.path.join(base, f"panoptic_{split}")
        dst = os.path.join(base, f"panoptic_semseg_{split}")
        for p in (pan_json, pan_root):
            if not os.path.exists(p):
                raise FileNotFoundError(
                    f"{p} not found: unpack panoptic_annotations_trainval2017.zip (and the PNG zips "
                    f"inside it) under {base} (see datasets/README.md)")
        with open(pan_json, encoding="utf-8") as f:
            anns = json.load(f)["annotations"]
        os.makedirs(dst, exist_ok=True)
        by_name = {a["file_name"]: a["segments_info"] for a in anns}

        def convert(name: str, out: str) -> None:
            with Image.open(os.path.join(pan_root, name)) as im:
                rgb = np.asarray(im.convert("RGB"))
            Image.fromarray(panoptic_to_semantic(rgb, by_name[name], id_map)).save(out)

        jobs = [(name, os.path.join(dst, name)) for name in sorted(by_name)]
        _run(jobs, convert, workers, f"COCO {split}")
        outputs.append(dst)
    return outputs


_TASKS = {"ade20k_sem_seg": convert_ade20k_sem_seg,
          "coco_panoptic_semseg": convert_coco_panoptic_semseg}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(_TASKS))
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    args = parser.parse_args(argv)
    try:
        for out in _TASKS[args.task](args.root, args.workers):
            print(f"wrote {out}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
