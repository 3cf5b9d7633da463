#!/usr/bin/env python3
"""Train or evaluate Mask2Former (Detectron2-style command line, no Detectron2 needed).

    python train_net.py --config-file configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml \\
        MODEL.WEIGHTS R-50.pkl OUTPUT_DIR out/
    python train_net.py --config-file ... --resume OUTPUT_DIR out/          # continue out/last_checkpoint
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    torchrun --nproc_per_node 8 train_net.py --config-file ...              # multi-GPU
    python train_net.py --datasets my_datasets.yaml --config-file ... DATASETS.TRAIN "('my_train',)"
    python train_net.py --engine detectron2 --config-file ...                # Detectron2's trainer and evaluators

Built-in datasets are read from $DETECTRON2_DATASETS (default ./datasets; see datasets/README.md);
custom ones are registered from the YAML files given by --datasets or $M2F_DATASETS_YAML.

Outputs in OUTPUT_DIR: config.yaml, log.txt, metrics.json, TensorBoard events, model_*.pth,
last_checkpoint, inference/ (and inference_TTA/ for --eval-only with TEST.AUG.ENABLED), eval_results.json.
"""
import logging
import os
import sys

from mask2former.checkpoint import load_checkpoint
from mask2former.engine.defaults import default_argument_parser, setup
from mask2former.engine.trainer import Trainer
from mask2former.modeling.test_time_augmentation import build_tta_model
from mask2former.utils.comm import is_main_process
from mask2former.utils.results import format_results_table, write_eval_results
from mask2former.utils.rng import seed_all_rng

logger = logging.getLogger("mask2former.train_net")


def evaluate(cfg, args, trainer_cls=Trainer):
    """--eval-only: load the weights (OUTPUT_DIR/last_checkpoint with --resume, else MODEL.WEIGHTS)
    and evaluate on DATASETS.TEST; with TEST.AUG.ENABLED also the test-time-augmented model (its
    results beside the plain ones, keys suffixed ``_TTA``), as the official train_net.py does."""
    weights = cfg.MODEL.WEIGHTS
    if args.resume:
        tag = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if os.path.isfile(tag):
            with open(tag) as f:
                weights = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
    if not weights:
        raise SystemExit("--eval-only needs weights: set MODEL.WEIGHTS /path/to/model.pth (or use --resume "
                         "with an OUTPUT_DIR that has a last_checkpoint)")
    if not os.path.isfile(weights):
        raise SystemExit(f"--eval-only: weights file {weights!r} does not exist")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    model = trainer_cls.build_model(cfg)
    load_checkpoint(model, weights)
    model.eval()
    build_tta_model(cfg, model)  # a model without test-time augmentation is refused before the long plain run
    results = trainer_cls.test(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        results.update(trainer_cls.test_with_tta(cfg, model))
    if is_main_process():
        print(format_results_table(results))
        write_eval_results(cfg.OUTPUT_DIR, results)
    return results


def run_detectron2(args):
    """--engine detectron2: Detectron2's DefaultTrainer and evaluators (mask2former.detectron2.trainer)."""
    from mask2former.detectron2 import INSTALL_HINT, is_available

    if not is_available():
        sys.stderr.write(f"--engine detectron2: {INSTALL_HINT}\nOr use the default --engine ours, which needs no "
                         "Detectron2.\n")
        raise SystemExit(2)
    from mask2former.detectron2.trainer import launch_main

    return launch_main(args)


def main(args, trainer_cls=Trainer):
    if getattr(args, "engine", "ours") == "detectron2":
        return run_detectron2(args)
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg, args, trainer_cls)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args, file=sys.stderr)
    try:
        main(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
