"""The config-driven :class:`Trainer`: builds model, optimizer, schedule, loader and the default
hooks from a config, and handles output directory, seed, DDP and resuming.

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)   # OUTPUT_DIR/last_checkpoint if any, else MODEL.WEIGHTS
    results = trainer.train()

Where things live: the loop (one step: AMP, loss reduction, non-finite stop, clipping, optimizer
and scheduler step) and the hook interface are in :mod:`mask2former.engine.train_loop`; the
default hooks (LR logging, checkpointing, evaluation, metrics writer, progress bar; see
:meth:`Trainer.build_hooks`) in :mod:`mask2former.engine.hooks`. Atomic writes are
:mod:`mask2former.utils.file_io`, results tables :mod:`mask2former.utils.results`, process groups
:mod:`mask2former.utils.comm`, seeds and RNG states :mod:`mask2former.utils.rng`.

Files in OUTPUT_DIR: ``config.yaml``; ``model_{i:07d}.pth`` every SOLVER.CHECKPOINT_PERIOD
iterations and ``model_final.pth``, each holding ``model``, ``optimizer``, ``scheduler``, ``scaler``
(AMP on CUDA only), ``iteration``, ``rng_states`` (per rank; with the generators that modules
keep themselves, e.g. kMaX-DeepLab's pixel sampling), ``world_size``, ``seed`` (the run's resolved
seed) and, when a registered hook has state, ``hooks``; ``last_checkpoint``, rewritten only once a
checkpoint is complete, so killing the process at any moment leaves a loadable one;
``metrics.json`` (and TensorBoard events) every ``log_period`` iterations; evaluation every
TEST.EVAL_PERIOD iterations and once at the end when DATASETS.TEST is set, the final results in
``eval_results.json``: ``{task: {metric: value}}`` for one test set, ``{dataset: {task: {metric:
value}}}`` for several. Temporary files left by a killed run are removed at start.

Model and training loader are built with SEED set to the run's seed (so that nothing draws a
seed of its own when SEED < 0). Resuming restores all of the state above and continues at
``iteration + 1``; the training loader is rebuilt with ``start_iter = iteration + 1``, and must then
yield exactly the batches an uninterrupted run would have seen from that iteration on (its
sampling and augmentation randomness must come from its own seed and the sample position, not
from the process' global RNG consumed lazily). With that, an interrupted and resumed run
reproduces the uninterrupted one, also with SEED -1.
"""
from __future__ import annotations

import collections
import inspect
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from ..solver import build_gradient_clipper, build_lr_scheduler, build_optimizer
from ..utils.comm import get_rank, get_world_size, init_distributed, is_main_process, synchronize
from ..utils.file_io import atomic_write, remove_stale_temp_files
from ..utils.results import EVAL_RESULTS_FILE, format_results_table
from ..utils.rng import resolve_seed, seed_all_rng
from . import hooks
from .hooks import FINAL_CHECKPOINT_NAME, METRICS_FILE
from .train_loop import LAST_CHECKPOINT_FILE, HookBase, TrainLoop

# Aliases kept for code that imported these helpers from this module; they live in mask2former.utils
# now (results.py, rng.py, file_io.py: atomic_write is the package's one atomic writer).
from ..utils.results import flatten_results, write_eval_results  # noqa: E402,F401
from ..utils.rng import get_rng_states, preserve_rng_states, set_rng_states  # noqa: E402,F401

write_text_atomic = atomic_write

__all__ = [
    "Trainer",
    "LAST_CHECKPOINT_FILE",
    "FINAL_CHECKPOINT_NAME",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "seed_all_rng",
    "get_rng_states",
    "set_rng_states",
    "preserve_rng_states",
    "write_text_atomic",
    "flatten_results",
    "format_results_table",
    "write_eval_results",
]

logger = logging.getLogger(__name__)

# Names of the outputs whose interrupted atomic writes are cleaned up at start.
_OUTPUT_NAMES = ("model_", LAST_CHECKPOINT_FILE + ".", METRICS_FILE + ".", "config.yaml.", EVAL_RESULTS_FILE + ".")


class Trainer(TrainLoop):
    """Trains ``cfg``'s model; see the module docstring for the files and the resume contract.

    The pieces come from overridable class methods (:meth:`build_model`, :meth:`build_optimizer`,
    :meth:`build_lr_scheduler`, :meth:`build_train_loader`, :meth:`build_test_loader`,
    :meth:`build_evaluator`, :meth:`inference_on_dataset`) and the hooks from :meth:`build_hooks`;
    more hooks can be added with :meth:`register_hooks`. ``build_model`` (``fn(cfg)``) and
    ``build_train_loader`` (``fn(cfg, start_iter)``) can also be passed to the constructor.
    """

    #: iterations between console / metrics.json / TensorBoard writes
    log_period: int = 20
    #: DistributedDataParallel option; Mask2Former uses every parameter in every iteration
    find_unused_parameters: bool = False

    def __init__(
        self,
        cfg,
        *,
        build_model: Optional[Callable[[Any], nn.Module]] = None,
        build_train_loader: Optional[Callable[[Any, int], Iterable]] = None,
        log_period: Optional[int] = None,
        tensorboard: bool = True,
        progress_bar: Optional[bool] = None,
    ):
        self.cfg = cfg
        self._model_fn = build_model
        self._loader_fn = build_train_loader
        if log_period is not None:
            self.log_period = int(log_period)
        if self.log_period <= 0:
            raise ValueError(f"log_period must be positive, got {self.log_period}")
        self._tensorboard = tensorboard
        self._progress_bar = progress_bar

        want_cuda = str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()
        init_distributed(use_cuda=want_cuda)
        rank = get_rank()
        self.output_dir = cfg.OUTPUT_DIR
        if is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            remove_stale_temp_files(self.output_dir, _OUTPUT_NAMES)
            atomic_write(os.path.join(self.output_dir, "config.yaml"), cfg.dump())
        synchronize()

        # The run's seed: cfg.SEED, or one drawn now (shared by all ranks) when SEED < 0. It seeds
        # the data loader and, plus the rank, the global RNGs; checkpoints store it, so a resumed
        # run continues with the same data order whatever the config's SEED.
        self.seed = resolve_seed(cfg.SEED)
        seed_all_rng(self.seed + rank)
        logger.info("Rank %d of %d, seed %d", rank, get_world_size(), self.seed)

        model = self._build_model(cfg)
        if dist.is_initialized() and not want_cuda and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            logger.warning("SyncBN needs CUDA in torch: CPU processes use per-process BatchNorm2d instead")
            model = _sync_bn_to_bn(model)
        optimizer = self.build_optimizer(cfg, model)
        super().__init__(
            self._wrap_ddp(model), optimizer, self.build_lr_scheduler(cfg, optimizer), self._build_train_loader,
            max_iter=int(cfg.SOLVER.MAX_ITER), model_without_ddp=model, clipper=build_gradient_clipper(cfg),
            amp=bool(cfg.SOLVER.AMP.ENABLED),
        )
        self.checkpoint_period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
        self.eval_period = int(cfg.TEST.EVAL_PERIOD)
        self._loaded = False
        self.register_hooks(self.build_hooks())

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if get_world_size() <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (BN statistics) stay per-process after the initial sync, as in Detectron2.
        kwargs: Dict[str, Any] = {"find_unused_parameters": self.find_unused_parameters}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
        return DistributedDataParallel(model, **kwargs)

    def build_hooks(self) -> List[HookBase]:
        """The default hooks (see :mod:`mask2former.engine.hooks`); override to change them."""
        return [
            hooks.LRLogger(),
            hooks.PeriodicCheckpointer(self.output_dir, self.checkpoint_period),
            hooks.EvalHook(self.eval_period, self._evaluate, self.output_dir,
                           final=bool(list(self.cfg.DATASETS.TEST))),
            hooks.MetricsWriter(self.output_dir, self.log_period, tensorboard=self._tensorboard),
            hooks.ProgressBar(self._progress_bar),
        ]

    # ------------------------------------------------------------------ overridable builders
    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        """The model of ``cfg`` without weights (:meth:`resume_or_load` loads them)."""
        from ..modeling import build_model

        return build_model(cfg, load_weights=False)

    @classmethod
    def build_optimizer(cls, cfg, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0) -> Iterable:
        from ..data.build import build_detection_train_loader

        return build_detection_train_loader(cfg, start_iter=start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str) -> Iterable:
        from ..data.build import build_detection_test_loader

        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        from ..evaluation import build_evaluators

        return build_evaluators(cfg, dataset_name, output_dir)

    @classmethod
    def inference_on_dataset(cls, model: nn.Module, data_loader: Iterable, evaluator) -> Mapping[str, Any]:
        from ..evaluation import inference_on_dataset

        return inference_on_dataset(model, data_loader, evaluator)

    def _with_run_seed(self, cfg):
        # model and loader see the run's resolved seed as SEED: with SEED < 0 nothing draws a
        # seed of its own that the checkpoint would not record
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SEED = int(self.seed)
        return cfg

    def _build_model(self, cfg) -> nn.Module:
        cfg = self._with_run_seed(cfg)
        return self._model_fn(cfg) if self._model_fn is not None else self.build_model(cfg)

    def _build_train_loader(self, start_iter: int) -> Iterable:
        cfg = self._with_run_seed(self.cfg)
        if self._loader_fn is not None:
            return self._loader_fn(cfg, start_iter)
        return self.build_train_loader(cfg, start_iter)

    # ------------------------------------------------------------------ evaluation
    @classmethod
    def test(cls, cfg, model: nn.Module, evaluators: Optional[List[Any]] = None,
             output_folder: str = "inference") -> Dict[str, Any]:
        """Evaluate ``model`` on every DATASETS.TEST set; the evaluators write their files to
        ``OUTPUT_DIR/<output_folder>`` (``/<dataset>`` below it when there are several).

        Returns ``{task: {metric: value}}`` for one test set and ``{dataset: {task: {metric:
        value}}}`` for several (empty on non-main ranks when the evaluators only report there).
        """
        names = list(cfg.DATASETS.TEST)
        if not names:
            logger.info("DATASETS.TEST is empty: nothing to evaluate")
            return {}
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} test sets {names}")
        per_dataset: Dict[str, Any] = collections.OrderedDict()
        for idx, name in enumerate(names):
            out_dir = os.path.join(cfg.OUTPUT_DIR, output_folder)
            if len(names) > 1:
                out_dir = os.path.join(out_dir, name)
            loader = cls.build_test_loader(cfg, name)
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, name, out_dir)
            res = cls.inference_on_dataset(model, loader, evaluator) or {}
            per_dataset[name] = dict(res)
            if is_main_process() and res:
                logger.info("Evaluation results for %s:\n%s", name, format_results_table(res))
        return per_dataset[names[0]] if len(names) == 1 else dict(per_dataset)

    @classmethod
    def test_with_tta(cls, cfg, model: nn.Module) -> Dict[str, Any]:
        """Evaluate the test-time-augmented ``model`` (TEST.AUG, see
        :mod:`mask2former.modeling.test_time_augmentation`) as the official ``test_with_TTA`` does:
        files in ``OUTPUT_DIR/inference_TTA``, every top-level key of :meth:`test`'s results
        (task, or dataset when there are several) suffixed ``_TTA``."""
        from ..modeling.test_time_augmentation import MaskFormerWithTTA

        logger.info("Running inference with test-time augmentation ...")
        results = cls.test(cfg, MaskFormerWithTTA.from_config(cfg, model), output_folder="inference_TTA")
        return {f"{k}_TTA": v for k, v in results.items()}

    def _evaluate(self) -> Dict[str, Any]:
        return self.test(self.cfg, self.model_without_ddp)

    # ------------------------------------------------------------------ checkpoints
    def last_checkpoint_path(self) -> Optional[str]:
        """The checkpoint named by OUTPUT_DIR/last_checkpoint, or None without that file."""
        tag = os.path.join(self.output_dir, LAST_CHECKPOINT_FILE)
        if not os.path.isfile(tag):
            return None
        with open(tag) as f:
            name = f.read().strip()
        path = os.path.join(self.output_dir, name)
        if not name or not os.path.isfile(path):
            raise FileNotFoundError(f"{tag} names {name!r}, but {path} does not exist")
        return path

    def resume_or_load(self, resume: bool = True) -> None:
        """With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR, restore the full training state
        from it; otherwise load MODEL.WEIGHTS into the model (if set) and start at iteration 0."""
        path = self.last_checkpoint_path() if resume else None
        if path is not None:
            it = self.load_training_state(path)
            self.start_iter = it + 1
            logger.info("Resumed from %s (iteration %d); continuing at iteration %d", path, it, self.start_iter)
        else:
            if resume:
                logger.info("No checkpoint found in %s: training from the start", self.output_dir)
            weights = self.cfg.MODEL.WEIGHTS
            if weights:
                if os.path.isfile(weights):
                    load_checkpoint(self.model_without_ddp, weights)
                else:
                    logger.warning("MODEL.WEIGHTS = %r does not exist; the model keeps its random "
                                   "initialisation (set it to a local file, or '' to silence this)", weights)
            self.start_iter = 0
        self._loaded = True

    def load_training_state(self, path: str) -> int:
        """Restore model, optimizer, scheduler, scaler, seed, RNG and hook states from ``path``;
        returns the iteration stored in it. RNG and hook states are applied when training starts."""
        state, meta = read_checkpoint(path)
        missing, unexpected = self.model_without_ddp.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{path} does not match the model: missing {missing[:10]}, unexpected "
                               f"{unexpected[:10]} (was it written for another config?)")
        for key in ("optimizer", "scheduler", "iteration"):
            if key not in meta:
                raise KeyError(f"{path} has no {key!r} entry: it is not a training checkpoint "
                               "(to start from weights only, set MODEL.WEIGHTS and do not resume)")
        self.optimizer.load_state_dict(meta["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if "seed" in meta:
            self.seed = int(meta["seed"])
        elif self.cfg.SEED < 0:
            logger.warning("%s does not record the run's seed (written by an older version) and SEED is %d: "
                           "the resumed data order will not match the interrupted run's", path, self.cfg.SEED)
        if self.scaler is not None:
            if "scaler" in meta:
                self.scaler.load_state_dict(meta["scaler"])
            else:
                logger.warning("%s has no GradScaler state; the loss scale starts afresh", path)
        hook_states = meta.get("hooks", {})  # absent in checkpoints of hooks without state
        if not isinstance(hook_states, dict):
            raise CheckpointError(f"{path}: its 'hooks' entry is a {type(hook_states).__name__}, expected a "
                                  "dict of hook states")
        self.load_hooks_state(hook_states)
        rng = meta.get("rng_states")
        if isinstance(rng, (list, tuple)) and len(rng) == self.world_size and meta.get("world_size") == self.world_size:
            self.pending_rng_states = rng[self.rank]
        else:
            saved_ws = meta.get("world_size")
            logger.warning("%s holds RNG states for world size %s, not %d: RNG streams are reseeded "
                           "instead, so the run will not match an uninterrupted one", path, saved_ws, self.world_size)
            self.pending_rng_states = None
            seed_all_rng(self.seed + self.rank + int(meta["iteration"]) + 1)
        self.last_saved = path
        return int(meta["iteration"])

    def state_dict(self) -> Dict[str, Any]:
        data = super().state_dict()
        data["world_size"] = self.world_size
        data["seed"] = int(self.seed)
        return data

    def train(self) -> Dict[str, Any]:
        """Train from ``start_iter`` to SOLVER.MAX_ITER, then evaluate; returns the final results."""
        if not self._loaded:
            self.resume_or_load(resume=False)
        super().train()
        return self.last_eval_results


def _any_rank(input: torch.Tensor) -> None:
    if input.dim() < 2:
        raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")


def _sync_bn_to_bn(module: nn.Module) -> nn.Module:
    """Replace SyncBatchNorm (CUDA only in torch) by BatchNorm2d for CPU process groups; like
    SyncBatchNorm it takes any input rank >= 2, (N, C, ...) (kMaX-DeepLab normalises 3-D and 5-D
    tensors)."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        bn._check_input_dim = _any_rank  # BatchNorm2d's own check accepts 4-D inputs only
        if module.affine:
            bn.weight = module.weight
            bn.bias = module.bias
        if module.track_running_stats:
            bn.running_mean = module.running_mean
            bn.running_var = module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = _sync_bn_to_bn(child)
        if new is not child:
            module.add_module(name, new)
    return module
