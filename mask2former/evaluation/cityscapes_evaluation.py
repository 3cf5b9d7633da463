"""Cityscapes semantic (IoU / iIoU) and instance (AP) evaluation with the official ``cityscapesscripts``.

The metrics are those of the Cityscapes benchmark, computed by ``cityscapesscripts`` (an
optional dependency: ``pip install cityscapesscripts``, or ``pip install "mask2former[cityscapes]"``)
from predictions written in its file formats:

* :class:`CityscapesSemSegEvaluator`: per image, ``<city>_<seq>_<frame>_pred.png``, the argmax
  of ``outputs[i]["sem_seg"]`` (K, H, W) mapped from train ids (the contiguous ids, in the order
  of ``stuff_classes``) to Cityscapes label ids. ``evalPixelLevelSemanticLabeling`` compares it
  with ``<gt_dir>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (and ``..._instanceIds.png``
  for the instance-weighted iIoU). Reported under Detectron2's names, in percent: ``IoU`` and
  ``iIoU`` (means over the 19 classes), ``IoU_sup`` and ``iIoU_sup`` (over the 7 categories).
  GT pixels of classes that are ignored in evaluation (label ids 0..6, 9, 10, 14..16, 18, 29, 30:
  train id 255) count for no class.
* :class:`CityscapesInstanceEvaluator`: per image, ``<city>_<seq>_<frame>_pred.txt`` listing one
  line ``<mask png> <label id> <score>`` per predicted instance of ``outputs[i]["instances"]``
  (``pred_masks`` (N, H, W), ``pred_classes`` indexing ``thing_classes``, ``scores``), with the
  binary masks as PNGs beside it. ``evalInstanceLevelSemanticLabeling`` matches them with the
  instances of ``..._gtFine_instanceIds.png``. Reported: ``AP`` (mean over IoU thresholds
  0.5:0.95 and the 8 classes) and ``AP50``, in percent. Empty masks are not written (the
  evaluation skips them anyway).

The dataset's metadata must have ``gt_dir`` (the ``gtFine/<split>`` folder) and the class names
(``stuff_classes`` / ``thing_classes``, Cityscapes names), which give the label ids. Image names
must follow the Cityscapes pattern ``<city>_<seq>_<frame>_*``.

Differences from Detectron2 (same values on a full run): the metrics cover the images that
were processed (a warning says when ``gt_dir`` has more), not every GT file of ``gt_dir``; in a
distributed run the prediction files of all processes are gathered onto rank 0, so it also
works across machines; and the instance evaluation calls the steps of
``evaluateImgLists`` itself, which does not leave a ``matches.json`` in the working directory.
The predictions are written to a temporary folder, removed on :meth:`reset` or when the
evaluator is garbage collected, or kept under ``output_dir`` when one is given (e.g. for the
test server).
"""
from __future__ import annotations

import abc
import contextlib
import glob
import importlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..data.catalog import MetadataCatalog, builtin_categories
from ..utils import comm
from .evaluator import DatasetEvaluator

__all__ = [
    "CityscapesSemSegEvaluator",
    "CityscapesInstanceEvaluator",
    "cityscapes_label_ids",
    "INSTALL_HINT",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install cityscapesscripts  (or: pip install "mask2former[cityscapes]")'

_CORE_NAME = re.compile(r"^([^_/]+)_(\d+)_(\d+)(?:_|\.|$)")


class _NumpyWithIn1d:
    """numpy plus ``in1d``: cityscapesscripts (2.3.0 and older) calls ``np.in1d``, which
    NumPy 2.4 removed. Installed only in the namespace of the cityscapesscripts evaluation
    modules, and only when numpy lacks it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def in1d(ar1: Any, ar2: Any, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
        return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)


def _cityscapes_module(name: str, user: str) -> Any:
    """``cityscapesscripts.evaluation.<name>``, or an ImportError saying how to install it."""
    try:
        module = importlib.import_module(f"cityscapesscripts.evaluation.{name}")
    except ImportError as e:
        raise ImportError(
            f"{user} needs the optional package cityscapesscripts, which could not be imported "
            f"({e}). Install it with: {INSTALL_HINT}"
        ) from e
    if not hasattr(np, "in1d") and not isinstance(getattr(module, "np", None), _NumpyWithIn1d):
        module.np = _NumpyWithIn1d()
    return module


def cityscapes_label_ids(class_names: Sequence[str], what: str) -> np.ndarray:
    """Cityscapes label ids (``labelIds``) of ``class_names``, as an int64 (K,) array.

    ``what`` names the table in the error raised for a name that is not a Cityscapes class.
    """
    by_name = {c["name"]: int(c["id"]) for c in builtin_categories("cityscapes")}
    unknown = [n for n in class_names if n not in by_name]
    if unknown:
        raise ValueError(
            f"{what} has names {unknown} that are not Cityscapes classes with a train id "
            f"(known: {sorted(by_name)})"
        )
    return np.array([by_name[n] for n in class_names], dtype=np.int64)


def _core_name(file_name: Any) -> str:
    """``<city>_<seq>_<frame>`` of a Cityscapes file name."""
    base = os.path.basename(str(file_name))
    m = _CORE_NAME.match(base)
    if not m:
        raise ValueError(
            f"Cityscapes evaluation needs image file names like "
            f"<city>_<seq>_<frame>_leftImg8bit.png; got {file_name!r}"
        )
    return "_".join(m.groups())


def _args_for(module: Any, **overrides: Any) -> Any:
    """A copy of the module's global ``args`` with ``overrides``, so that the module's own
    state (read by its ``main``) is left alone."""
    args = module.CArgs()
    args.__dict__.update(vars(module.args))
    args.__dict__.update(overrides)
    return args


def _run_cityscapes(fn: Any, *args: Any) -> Any:
    """Calls a cityscapesscripts function with its printing captured; its ``printError`` (which
    exits the interpreter) becomes a RuntimeError with the message."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            # nanmean over classes without any GT instance warns, and gives NaN as it should
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args)
    except SystemExit:
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        raise RuntimeError(
            f"cityscapesscripts failed: {lines[-1] if lines else 'no message'}"
        ) from None


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class _CityscapesEvaluator(DatasetEvaluator, abc.ABC):
    """Writes per-image prediction files, gathers them on rank 0 and scores them there."""

    _MODULE = ""  # cityscapesscripts.evaluation module that computes the metrics
    _TASK = ""  # sub-folder of output_dir
    _RESULT_KEY = ""  # key of the metrics in evaluate()'s result
    _GT_SUFFIXES: Tuple[str, ...] = ()  # GT files each image needs; the first is the one compared

    def __init__(self, dataset_name: str, *, distributed: bool = True, output_dir: Optional[str] = None):
        self._module()  # fail now, not after inference, when cityscapesscripts is missing
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        gt_dir = self._metadata.get("gt_dir")
        if not gt_dir:
            raise ValueError(
                f"{type(self).__name__} needs metadata 'gt_dir' (the Cityscapes gtFine/<split> "
                f"folder) for dataset {dataset_name!r}"
            )
        self._gt_dir = str(gt_dir)
        self._distributed = distributed
        self._output_dir = output_dir
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.reset()

    def _module(self) -> Any:
        return _cityscapes_module(self._MODULE, type(self).__name__)

    def reset(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._output_dir and comm.is_main_process():
            self._pred_dir = os.path.abspath(os.path.join(self._output_dir, self._TASK))
            os.makedirs(self._pred_dir, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{self._TASK}_eval_")
            self._pred_dir = os.path.abspath(self._tmp.name)
        # per image: (core name, GT file, prediction file, every file written), names relative
        # to the prediction folder
        self._records: List[Tuple[str, str, str, List[str]]] = []
        self._seen: Dict[str, str] = {}

    def _gt_file(self, core: str, file_name: str) -> str:
        city = core.split("_")[0]
        paths = [os.path.join(self._gt_dir, city, core + s) for s in self._GT_SUFFIXES]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"No Cityscapes ground truth for image {file_name!r}: {p} does not exist "
                    f"(gt_dir of dataset {self._dataset_name!r} is {self._gt_dir})"
                )
        return paths[0]

    def _check_size(self, gt: str, shape: Tuple[int, int], file_name: str) -> None:
        with Image.open(gt) as im:
            w, h = im.size
        if tuple(shape) != (h, w):
            raise ValueError(
                f"Image {file_name!r}: the prediction is {shape[0]}x{shape[1]} but the ground "
                f"truth {gt} is {h}x{w}"
            )

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "file_name" not in inp:
                raise KeyError(f"{type(self).__name__} needs 'file_name' in every input dict "
                               f"(keys: {sorted(inp)})")
            file_name = inp["file_name"]
            core = _core_name(file_name)
            if core in self._seen:
                raise ValueError(f"Image {core!r} was processed twice ({self._seen[core]!r} and "
                                 f"{file_name!r})")
            gt = self._gt_file(core, file_name)
            pred, files = self._write(core, gt, out, file_name)
            self._seen[core] = file_name
            self._records.append((core, gt, pred, files))

    @abc.abstractmethod
    def _write(self, core: str, gt: str, output: dict, file_name: str) -> Tuple[str, List[str]]:
        """Writes the prediction files of one image; returns (the file compared, all files)."""

    @abc.abstractmethod
    def _compute(self, predictions: List[str], gts: List[str]) -> Dict[str, float]:
        """The metrics of the prediction files against the GT files (same order)."""

    def _gathered(self) -> Optional[List[Tuple[str, str, str, List[str]]]]:
        """Every process's records on rank 0, with the other ranks' files copied into
        ``self._pred_dir``; None on the other ranks."""
        if not (self._distributed and comm.get_world_size() > 1):
            return list(self._records)
        comm.synchronize()
        payload: Dict[str, bytes] = {}
        if not comm.is_main_process():
            for rec in self._records:
                for name in rec[3]:
                    with open(os.path.join(self._pred_dir, name), "rb") as f:
                        payload[name] = f.read()
        parts = comm.gather((self._records, payload))
        if not comm.is_main_process():
            return None
        records: List[Tuple[str, str, str, List[str]]] = []
        seen = set()
        for rank, (recs, files) in enumerate(parts):
            for rec in recs:
                if rec[0] in seen:
                    raise ValueError(f"Image {rec[0]!r} was processed by two processes")
                seen.add(rec[0])
                records.append(rec)
            if rank == 0:
                continue
            for name, data in files.items():
                with open(os.path.join(self._pred_dir, name), "wb") as f:
                    f.write(data)
        return records

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        records = self._gathered()
        if records is None:
            return {}
        if not records:
            logger.warning("%s received no predictions", type(self).__name__)
            return {}
        n_gt = len(glob.glob(os.path.join(glob.escape(self._gt_dir), "*", "*" + self._GT_SUFFIXES[0])))
        if len(records) < n_gt:
            logger.warning(
                "Only %d of the %d images under %s were processed; the Cityscapes metrics cover "
                "the processed ones", len(records), n_gt, self._gt_dir,
            )
        records.sort()
        logger.info("Evaluating %d images with cityscapesscripts (predictions in %s) ...",
                    len(records), self._pred_dir)
        preds = [os.path.join(self._pred_dir, r[2]) for r in records]
        gts = [os.path.abspath(r[1]) for r in records]
        res = self._compute(preds, gts)
        logger.info("%s: %s", self._TASK, "  ".join(f"{k}={v:.3f}" for k, v in res.items()))
        return OrderedDict({self._RESULT_KEY: res})


class CityscapesSemSegEvaluator(_CityscapesEvaluator):
    """Cityscapes IoU / iIoU (classes and categories) of ``sem_seg`` outputs.

    Args:
        dataset_name: name in :data:`MetadataCatalog` with ``gt_dir`` and ``stuff_classes``
            (the 19 Cityscapes class names in train-id order).
        distributed: gather the predictions of all processes on rank 0.
        output_dir: keep the ``*_pred.png`` label-id images under
            ``<output_dir>/cityscapes_sem_seg`` (default: a temporary folder).

    ``evaluate()`` returns ``{"sem_seg": {"IoU", "iIoU", "IoU_sup", "iIoU_sup"}}`` in percent
    (NaN when no GT pixel of any class was seen).
    """

    _MODULE = "evalPixelLevelSemanticLabeling"
    _TASK = "cityscapes_sem_seg"
    _RESULT_KEY = "sem_seg"
    _GT_SUFFIXES = ("_gtFine_labelIds.png", "_gtFine_instanceIds.png")

    def __init__(self, dataset_name: str, *, distributed: bool = True, output_dir: Optional[str] = None):
        names = MetadataCatalog.get(dataset_name).get("stuff_classes")
        if not names:
            raise ValueError(
                f"CityscapesSemSegEvaluator needs metadata 'stuff_classes' for dataset {dataset_name!r}"
            )
        self._label_ids = cityscapes_label_ids(
            names, f"stuff_classes of dataset {dataset_name!r}").astype(np.uint8)
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)

    def _write(self, core: str, gt: str, output: dict, file_name: str) -> Tuple[str, List[str]]:
        if "sem_seg" not in output:
            raise KeyError(f"Image {file_name!r}: model output has no 'sem_seg' (keys: {sorted(output)})")
        scores = output["sem_seg"]
        k = len(self._label_ids)
        if scores.dim() != 3 or scores.shape[0] != k:
            raise ValueError(
                f"Image {file_name!r}: sem_seg must be ({k}, H, W) scores; got shape {tuple(scores.shape)}"
            )
        train_ids = scores.argmax(dim=0).cpu().numpy()
        self._check_size(gt, train_ids.shape, file_name)
        name = core + "_pred.png"
        Image.fromarray(self._label_ids[train_ids]).save(os.path.join(self._pred_dir, name))
        return name, [name]

    def _compute(self, predictions: List[str], gts: List[str]) -> Dict[str, float]:
        module = self._module()
        args = _args_for(module, quiet=True, JSONOutput=False, colorized=False, bold="", nocol="",
                         evalInstLevelScore=True, evalPixelAccuracy=False)
        r = _run_cityscapes(module.evaluateImgLists, predictions, gts, args)
        return OrderedDict([
            ("IoU", 100.0 * float(r["averageScoreClasses"])),
            ("iIoU", 100.0 * float(r["averageScoreInstClasses"])),
            ("IoU_sup", 100.0 * float(r["averageScoreCategories"])),
            ("iIoU_sup", 100.0 * float(r["averageScoreInstCategories"])),
        ])


class CityscapesInstanceEvaluator(_CityscapesEvaluator):
    """Cityscapes instance-segmentation AP of ``instances`` outputs.

    Args:
        dataset_name: name in :data:`MetadataCatalog` with ``gt_dir`` and ``thing_classes``
            (Cityscapes class names; ``pred_classes`` index this list).
        distributed: gather the predictions of all processes on rank 0.
        output_dir: keep the ``*_pred.txt`` files and mask PNGs under
            ``<output_dir>/cityscapes_instance`` (default: a temporary folder).

    ``evaluate()`` returns ``{"segm": {"AP", "AP50"}}`` in percent (NaN when the processed
    images have no GT instance of any class).
    """

    _MODULE = "evalInstanceLevelSemanticLabeling"
    _TASK = "cityscapes_instance"
    _RESULT_KEY = "segm"
    _GT_SUFFIXES = ("_gtFine_instanceIds.png",)

    def __init__(self, dataset_name: str, *, distributed: bool = True, output_dir: Optional[str] = None):
        names = MetadataCatalog.get(dataset_name).get("thing_classes")
        if not names:
            raise ValueError(
                f"CityscapesInstanceEvaluator needs metadata 'thing_classes' for dataset {dataset_name!r}"
            )
        self._label_ids = cityscapes_label_ids(names, f"thing_classes of dataset {dataset_name!r}")
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir)

    def _write(self, core: str, gt: str, output: dict, file_name: str) -> Tuple[str, List[str]]:
        if "instances" not in output:
            raise KeyError(f"Image {file_name!r}: model output has no 'instances' (keys: {sorted(output)})")
        instances = output["instances"]
        n = len(instances)
        lines: List[str] = []
        files: List[str] = []
        if n:
            masks = _to_numpy(instances.pred_masks)
            if masks.ndim != 3:
                raise ValueError(f"Image {file_name!r}: pred_masks must be (N, H, W); got shape {masks.shape}")
            self._check_size(gt, masks.shape[1:], file_name)
            masks = masks > 0.5 if np.issubdtype(masks.dtype, np.floating) else masks.astype(bool)
            scores = _to_numpy(instances.scores).reshape(-1).astype(np.float64)
            classes = _to_numpy(instances.pred_classes).reshape(-1).astype(np.int64)
            k = len(self._label_ids)
            if classes.size and (classes.min() < 0 or classes.max() >= k):
                raise ValueError(
                    f"Image {file_name!r}: pred_classes must index the {k} thing_classes of dataset "
                    f"{self._dataset_name!r}; got values in [{classes.min()}, {classes.max()}]"
                )
            for i in range(n):
                if not masks[i].any():
                    continue
                label_id = int(self._label_ids[classes[i]])
                name = f"{core}_{i}_{label_id}.png"
                Image.fromarray(masks[i].astype(np.uint8) * 255).save(
                    os.path.join(self._pred_dir, name), compress_level=1)
                lines.append(f"{name} {label_id} {float(scores[i])!r}\n")
                files.append(name)
        txt = core + "_pred.txt"
        with open(os.path.join(self._pred_dir, txt), "w", encoding="utf-8") as f:
            f.writelines(lines)
        return txt, files + [txt]

    def _compute(self, predictions: List[str], gts: List[str]) -> Dict[str, float]:
        module = self._module()
        args = _args_for(module, quiet=True, JSONOutput=False, colorized=False, csv=False,
                         distanceAvailable=False, predictionPath=self._pred_dir)
        # evaluateImgLists without its file output (gtInstances.json cache, matches.json in the
        # working directory)
        module.setInstanceLabels(args)
        gt_instances = _run_cityscapes(module.instances2dict, gts, False)
        matches = _run_cityscapes(module.matchGtWithPreds, predictions, gts, gt_instances, args)
        aps = _run_cityscapes(module.evaluateMatches, matches, args)
        avg = _run_cityscapes(module.computeAverages, aps, args)
        return OrderedDict([
            ("AP", 100.0 * float(avg["allAp"])),
            ("AP50", 100.0 * float(avg["allAp50%"])),
        ])
