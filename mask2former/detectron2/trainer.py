"""Training and evaluation with Detectron2's engine: ``train_net.py --engine detectron2`` (needs
Detectron2).

The same configs and checkpoints as the default engine: the config is Detectron2's
``get_cfg()`` plus this package's DeepLab and Mask2Former keys; the model is this package's
(:mod:`mask2former.detectron2.registration`); optimizer, gradient clipping and LR schedule are
this package's (``SOLVER.*``); data come from this package's mappers through Detectron2's
loaders; evaluation uses Detectron2's evaluators, chosen by the dataset's ``evaluator_type`` as
in the official training script (the choice shared with this package's engine:
:mod:`mask2former.evaluation.selection`). ``model_final.pth`` loads in either engine.
"""
import logging
import os
from typing import Any, Optional

import torch
import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg as _d2_get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_setup, launch
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    SemSegEvaluator,
    verify_results,
)
from detectron2.utils.logger import setup_logger

from ..config import CfgNode, add_deeplab_config, add_kmax_deeplab_config, add_maskformer2_config
from ..data.ids import contiguous_to_dataset
from ..evaluation.selection import select_evaluator_kinds
from ..solver import build_gradient_clipper, build_lr_scheduler, build_optimizer
from .convert import build_mapper
from .registration import register_all

__all__ = ["get_cfg", "load_config", "setup", "Trainer", "InstanceSegEvaluator", "build_evaluator", "main", "launch_main"]

logger = logging.getLogger(__name__)


def get_cfg(meta_architecture: str = ""):
    """Detectron2's default config with the DeepLab and Mask2Former keys added; for
    ``meta_architecture`` "kMaXDeepLab" also kMaX-DeepLab's, as its official training script adds
    them (``add_kmax_deeplab_config``: the shared keys, INPUT.IMAGE_SIZE an [h, w] list among
    them, at kMaX's defaults; Detectron2's config keeps the type of a key's default)."""
    cfg = _d2_get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    if meta_architecture == "kMaXDeepLab":
        add_kmax_deeplab_config(cfg)
    return cfg


def _meta_architecture(data: dict, opts) -> str:
    """MODEL.META_ARCHITECTURE of a loaded config file and its KEY VALUE overrides."""
    opts = list(opts or [])
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.META_ARCHITECTURE":
            return str(value)
    model = data.get("MODEL")
    return str(model.get("META_ARCHITECTURE", "")) if isinstance(model, dict) else ""


def load_config(config_file: Optional[str] = None, opts=()):
    """The Detectron2 config of ``config_file`` and ``opts`` (KEY VALUE overrides): :func:`get_cfg`
    for the file's MODEL.META_ARCHITECTURE, the file, then the overrides."""
    # read with this package's loader, which never runs code from the file (Detectron2's
    # merge_from_file falls back to yaml.unsafe_load), then merged as Detectron2 merges files
    data = CfgNode.load_yaml_with_base(str(config_file), allow_unsafe=True) if config_file else {}
    cfg = get_cfg(_meta_architecture(data, opts))
    if config_file:
        cfg.merge_from_other_cfg(type(cfg)(data))
    cfg.merge_from_list(list(opts or []))
    return cfg


class _WithoutThingTable:
    """A metadata view hiding ``thing_dataset_id_to_contiguous_id`` (see InstanceSegEvaluator)."""

    _HIDDEN = "thing_dataset_id_to_contiguous_id"

    def __init__(self, metadata):
        self._metadata = metadata

    def __getattr__(self, key):
        if key == self._HIDDEN:
            raise AttributeError(key)
        return getattr(self._metadata, key)

    def get(self, key, default=None):
        return default if key == self._HIDDEN else self._metadata.get(key, default)


class InstanceSegEvaluator(COCOEvaluator):
    """COCO mask/box AP for panoptic datasets whose thing classes are not contiguous ids
    0..T-1 (ADE20K, Mapillary Vistas), which Detectron2's COCOEvaluator requires: predictions are
    mapped to dataset category ids here, and those of non-thing classes are dropped."""

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        to_dataset = contiguous_to_dataset(self._metadata, "thing")
        for pred in self._predictions[start:]:
            if "instances" in pred:
                pred["instances"] = [dict(r, category_id=to_dataset[r["category_id"]]) for r in pred["instances"]
                                     if r["category_id"] in to_dataset]

    def _eval_predictions(self, predictions, img_ids=None):
        metadata = self._metadata
        self._metadata = _WithoutThingTable(metadata)  # the ids are already the dataset's
        try:
            super()._eval_predictions(predictions, img_ids=img_ids)
        finally:
            self._metadata = metadata


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """Detectron2 evaluators for ``dataset_name``: the kinds that
    :func:`mask2former.evaluation.selection.select_evaluator_kinds` chooses from its
    ``evaluator_type`` and MODEL.MASK_FORMER.TEST.{SEMANTIC,INSTANCE,PANOPTIC}_ON (the official
    choice), each mapped to its Detectron2 class."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    build = {
        "sem_seg": lambda: SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder),
        "coco_panoptic": lambda: COCOPanopticEvaluator(dataset_name, output_folder),
        "coco_instances": lambda: COCOEvaluator(dataset_name, output_dir=output_folder),
        "instance_seg": lambda: InstanceSegEvaluator(dataset_name, output_dir=output_folder),
        "cityscapes_sem_seg": lambda: CityscapesSemSegEvaluator(dataset_name),
        "cityscapes_instance": lambda: CityscapesInstanceEvaluator(dataset_name),
        "lvis": lambda: LVISEvaluator(dataset_name, output_dir=output_folder),
    }
    evaluators = [build[kind]() for kind in select_evaluator_kinds(cfg, dataset_name, evaluator_type)]
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def _with_gradient_clipping(optimizer: torch.optim.Optimizer, clipper) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` clip the gradients first (Detectron2's trainers call only
    ``step()``); the optimizer's class becomes a subclass of its own with that step."""
    if clipper is None:
        return optimizer
    base = type(optimizer)

    def step(self, closure=None):
        clipper(self)
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithGradientClipping", (base,), {"step": step})
    return optimizer


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with this package's solver, mappers and the official
    choice of Detectron2 evaluators."""

    @classmethod
    def build_optimizer(cls, cfg, model):
        return _with_gradient_clipping(build_optimizer(cfg, model), build_gradient_clipper(cfg))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = build_mapper(cfg, True)
        if not mapper.needs_dataset:
            return build_detection_train_loader(cfg, mapper=mapper)
        # kMaX's copy-paste draws its second images from the training list the loader samples
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
        mapper.bind_dataset(dataset)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


def setup(args):
    """Config from ``args`` (Detectron2 defaults + DeepLab + Mask2Former keys, + kMaX-DeepLab's for a
    kMaX config, --config-file, opts), Detectron2's ``default_setup`` (output dir, config.yaml, logging, seed)."""
    from ..engine.defaults import register_custom_datasets

    register_custom_datasets(getattr(args, "datasets", None) or [])
    register_all()  # also mirrors the datasets just registered
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mask2former")
    return cfg


def _report(cfg, results) -> None:
    if not comm.is_main_process() or not results:
        return
    from ..utils.results import format_results_table, write_eval_results

    verify_results(cfg, results)
    print(format_results_table(results))
    write_eval_results(cfg.OUTPUT_DIR, results)


def main(args) -> Any:
    """Train (or with --eval-only evaluate) in this process; see :func:`launch_main`."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        _report(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    _report(cfg, results)
    return results


def launch_main(args) -> Any:
    """Run :func:`main`: in this process for one GPU/CPU (returning the results), else under
    Detectron2's ``launch``, which starts one process per GPU ("env://" as --dist-url means
    "auto" on one machine)."""
    if args.num_gpus <= 1 and args.num_machines <= 1:
        return main(args)
    dist_url = args.dist_url
    if dist_url == "env://" and args.num_machines == 1 and "MASTER_ADDR" not in os.environ:
        dist_url = "auto"
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=dist_url, args=(args,))
