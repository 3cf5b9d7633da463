"""Conversions that turn downloaded benchmark archives into the layouts the loaders expect.

    python -m mask2former.data.prepare TASK [--root DIR] [--workers N]

This module is the command line; each task is a conversion of its dataset family (``PREPARE`` of
:mod:`.datasets.coco` and :mod:`.datasets.ade20k`), whose functions are importable from here as
before.

``--root`` defaults to ``$DETECTRON2_DATASETS`` (else ``./datasets``). Existing outputs are
overwritten. Cityscapes needs the official cityscapesscripts instead (see ``datasets/README.md``).
The tasks (each reads only files of the user's download; the class tables are the package's
built-in metadata):

* ``ade20k_sem_seg``: ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = "other",
  1..150 = classes) -> ``annotations_detectron2/...``: each label minus one, so that the classes
  are 0..149 and "other" becomes the ignore label 255.
* ``coco_panoptic_semseg``: ``coco/panoptic_{train,val}2017/*.png`` with
  ``coco/annotations/panoptic_{train,val}2017.json`` -> ``coco/panoptic_semseg_{train,val}2017/``:
  every pixel of a segment gets its category's contiguous id (0..132, the order of the COCO
  panoptic categories; crowd regions included), unlabeled pixels 255.
* ``coco_stuff_10k``: ``coco/coco_stuff_10k/{images/*.jpg, annotations/*.mat,
  imageLists/{train,test}.txt}`` (cocostuff-10k v1.0 or v1.1) ->
  ``images_detectron2/{train,test}/*.jpg`` (copies) and ``annotations_detectron2/{train,test}/*.png``
  with the 171 classes as 0..170 (see :func:`coco_stuff_10k_labels`) and 255 for "unlabeled".
* ``ade20k_full``: ``ADE20K_2021_17_01/images/**/<name>.jpg`` with ``<name>_seg.png`` ->
  ``images_detectron2/{training,validation}/<name>.jpg`` and
  ``annotations_detectron2/{training,validation}/<name>.tif`` (see :func:`ade20k_full_labels`),
  the shorter side brought down to 512 pixels when longer.
* ``ade20k_panoptic``: ``ADEChallengeData2016/annotations/`` with ``annotations_instance/``
  (from ``annotations_instance.tar`` of the 2017 Places challenge) ->
  ``ade20k_panoptic_{train,val}/*.png`` and ``ade20k_panoptic_{train,val}.json`` (see
  :func:`ade20k_panoptic_of`).
* ``ade20k_instance``: ``annotations_instance/`` -> ``ade20k_instance_{train,val}.json``, COCO
  instances with RLE masks and the ADE20K-150 class ids of the 100 instance classes.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence

from .catalog import family_table
# the conversions and their helpers, importable from here as before
from .datasets.ade20k import (  # noqa: F401
    ade20k_full_labels,
    ade20k_instance_annotations,
    ade20k_instance_masks,
    ade20k_label_to_detectron2,
    ade20k_panoptic_of,
    convert_ade20k_full,
    convert_ade20k_instance,
    convert_ade20k_panoptic,
    convert_ade20k_sem_seg,
)
from .datasets.builtin import datasets_root  # noqa: F401
from .datasets.coco import (  # noqa: F401
    coco_stuff_10k_labels,
    convert_coco_panoptic_semseg,
    convert_coco_stuff_10k,
    panoptic_to_semantic,
    read_coco_stuff_10k_mat,
)

__all__ = ["ade20k_label_to_detectron2", "convert_ade20k_sem_seg", "panoptic_to_semantic",
           "convert_coco_panoptic_semseg", "coco_stuff_10k_labels", "read_coco_stuff_10k_mat",
           "convert_coco_stuff_10k", "ade20k_full_labels", "convert_ade20k_full",
           "ade20k_instance_masks", "ade20k_panoptic_of", "convert_ade20k_panoptic",
           "ade20k_instance_annotations", "convert_ade20k_instance", "tasks", "main"]


def tasks() -> Dict[str, Callable[[Optional[str], int], List[str]]]:
    """Every family's preparation tasks: name -> ``convert(root, workers)`` returning the paths
    it wrote."""
    return family_table("PREPARE")


def main(argv: Optional[Sequence[str]] = None) -> int:
    table = tasks()
    parser = argparse.ArgumentParser(prog="python -m mask2former.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(table))
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    args = parser.parse_args(argv)
    try:
        for out in table[args.task](args.root, args.workers):
            print(f"wrote {out}")
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
