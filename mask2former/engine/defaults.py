"""Command-line plumbing shared by ``train_net.py``: argument parser, config setup, logging.

Multi-GPU training is launched by torchrun, one process per GPU; nothing here spawns processes:

    torchrun --nproc_per_node 8 train_net.py --config-file cfg.yaml
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        train_net.py --config-file cfg.yaml
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Optional

import torch

from ..config import get_cfg
from ..utils.comm import get_rank, get_world_size, init_distributed, is_main_process
from ..utils.file_io import atomic_write

__all__ = ["default_argument_parser", "default_setup", "setup", "setup_logger", "check_launch",
           "register_custom_datasets"]

_HANDLER_TAG = "_mask2former_handler"


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """Detectron2's training-script arguments, plus ``--engine``."""
    prog = os.path.basename(sys.argv[0]) or "train_net.py"
    parser = argparse.ArgumentParser(
        epilog=epilog or f"""
Examples:

Train on one GPU (or the CPU):
    $ python {prog} --config-file cfg.yaml

Train on 8 GPUs of one machine:
    $ torchrun --nproc_per_node 8 {prog} --config-file cfg.yaml

Change config options, resume, evaluate:
    $ python {prog} --config-file cfg.yaml SOLVER.BASE_LR 0.001 OUTPUT_DIR out/
    $ python {prog} --config-file cfg.yaml --resume OUTPUT_DIR out/
    $ python {prog} --config-file cfg.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last_checkpoint when it exists (otherwise "
                             "start from MODEL.WEIGHTS)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="GPUs per machine; > 1 must be launched with torchrun --nproc_per_node")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines (via torchrun)")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (via torchrun)")
    parser.add_argument("--dist-url", default="env://",
                        help="accepted for Detectron2 compatibility; torchrun's environment is used")
    parser.add_argument("--engine", choices=("ours", "detectron2"), default="ours",
                        help="training engine: this package's trainer (default) or Detectron2's")
    parser.add_argument("--datasets", action="append", default=[], metavar="FILE",
                        help="YAML file of custom datasets to register (repeatable; see "
                             "mask2former/data/datasets/custom.py); $M2F_DATASETS_YAML is read too")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help='config overrides as space-separated "KEY VALUE" pairs at the end')
    return parser


def check_launch(args) -> None:
    """Exit with instructions when multi-process training was asked for without torchrun."""
    under_torchrun = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if args.num_gpus > 1 and args.num_gpus != local:
            logging.getLogger(__name__).warning(
                "--num-gpus %d ignored: torchrun started %d processes on this machine", args.num_gpus, local)
        return
    if args.num_gpus > 1 or args.num_machines > 1:
        script = os.path.basename(sys.argv[0]) or "train_net.py"
        rest = []
        if args.config_file:
            rest += ["--config-file", args.config_file]
        for path in getattr(args, "datasets", None) or []:
            rest += ["--datasets", path]
        rest += [flag for flag, on in (("--resume", args.resume), ("--eval-only", args.eval_only)) if on]
        rest += list(args.opts or [])
        rest = shlex.join(rest)
        msg = (f"--num-gpus {args.num_gpus} / --num-machines {args.num_machines}: this script does not "
               "start processes itself. Launch one process per GPU with torchrun, e.g.\n"
               f"    torchrun --nproc_per_node {max(args.num_gpus, 1)} {script} {rest}\n")
        if args.num_machines > 1:
            msg += (f"and on several machines add --nnodes {args.num_machines} --node_rank "
                    "<this machine's rank> --master_addr <rank-0 host> --master_port <port>\n")
        sys.stderr.write(msg)
        raise SystemExit(2)


def check_engine(args) -> None:
    if getattr(args, "engine", "ours") != "detectron2":
        return
    try:
        import detectron2  # noqa: F401
    except ImportError:
        sys.stderr.write(
            "--engine detectron2 needs Detectron2, which is not installed. Install it with\n"
            "    pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
            "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), or use the "
            "default --engine ours.\n")
        raise SystemExit(2)
    sys.stderr.write("--engine detectron2 is not implemented by mask2former.engine.setup (this package's own "
                     "engine); train_net.py --engine detectron2 runs mask2former.detectron2.trainer.\n")
    raise SystemExit(2)


def setup_logger(output: Optional[str] = None, distributed_rank: int = 0, name: str = "mask2former",
                 level: int = logging.INFO) -> logging.Logger:
    """Console (rank 0 only) and file logging for ``name``'s loggers.

    The file is ``output/log.txt`` on rank 0 and ``output/log.txt.rank{r}`` on other ranks (or
    ``output`` itself when it ends in .txt/.log). Calling it again replaces the handlers it added.
    """
    log = logging.getLogger(name)
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, _HANDLER_TAG, False):
            log.removeHandler(h)
            h.close()
    fmt = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    if distributed_rank == 0:
        ch = logging.StreamHandler(sys.stdout)
        ch.setFormatter(fmt)
        setattr(ch, _HANDLER_TAG, True)
        log.addHandler(ch)
    if output:
        if output.endswith((".txt", ".log")):
            filename = output
        else:
            filename = os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        fh = logging.FileHandler(filename, mode="a")
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                          datefmt="%m/%d %H:%M:%S"))
        setattr(fh, _HANDLER_TAG, True)
        log.addHandler(fh)
    return log


def default_setup(cfg, args) -> None:
    """Output dir, logging, environment/config logging, config.yaml, cuDNN / fp32 settings."""
    output_dir = cfg.OUTPUT_DIR
    rank = get_rank()
    if is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    log = setup_logger(output_dir, distributed_rank=rank)
    log.info("Rank of current process: %d. World size: %d", rank, get_world_size())
    log.info("torch %s, CUDA available: %s", torch.__version__, torch.cuda.is_available())
    log.info("Command line arguments: %s", args)
    if getattr(args, "config_file", ""):
        with open(args.config_file) as f:
            log.info("Contents of %s:\n%s", args.config_file, f.read())
    if is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        atomic_write(path, cfg.dump())
        log.info("Full config saved to %s", path)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    precision = cfg.get("FLOAT32_PRECISION", "")
    if precision and torch.cuda.is_available():
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = precision != "highest"
        log.info("float32 matmul precision: %s", precision)


def register_custom_datasets(paths) -> list:
    """Register the datasets of the ``--datasets`` YAML files (before the config names them)."""
    from ..data.datasets.custom import register_datasets_yaml

    names = []
    for path in paths:
        names += register_datasets_yaml(path)
    if names:
        logging.getLogger(__name__).info("Registered custom datasets: %s", ", ".join(names))
    return names


def setup(args):
    """Config from ``args`` (defaults + --config-file + opts, frozen), then :func:`default_setup`."""
    check_launch(args)
    check_engine(args)
    register_custom_datasets(getattr(args, "datasets", None) or [])
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts or []))
    cfg.freeze()
    init_distributed(use_cuda=str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available())
    default_setup(cfg, args)
    return cfg
