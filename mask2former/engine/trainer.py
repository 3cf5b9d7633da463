"""Training loop: optimizer, LR schedule, AMP, clipping, checkpoints, evaluation and logging.

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)   # OUTPUT_DIR/last_checkpoint if any, else MODEL.WEIGHTS
    results = trainer.train()

One iteration: ``batch = next(loader)``; ``loss_dict = model(batch)`` (under autocast when
``SOLVER.AMP.ENABLED``: fp16 with a GradScaler on CUDA, bf16 without one on CPU); the losses
are summed; a non-finite loss stops training (:class:`FloatingPointError` naming the iteration
and the terms) before anything is updated or saved; backward; gradient clipping (on unscaled
gradients); ``optimizer.step()``; ``scheduler.step()``.

After iteration ``i`` (0-based), in this order:

* checkpoint ``model_{i:07d}.pth`` when ``(i + 1) % SOLVER.CHECKPOINT_PERIOD == 0`` and
  ``model_final.pth`` after the last iteration. Each file holds ``model``, ``optimizer``,
  ``scheduler``, ``scaler`` (AMP on CUDA only), ``iteration`` = i, ``rng_states`` (one entry per
  rank: python ``random``, numpy, torch CPU and, when initialised, the current CUDA generator)
  and ``world_size``. Files are written atomically and ``last_checkpoint`` (a text file with the
  file name) is rewritten, atomically, only once the checkpoint is complete, so killing the
  process at any moment leaves a loadable ``last_checkpoint``;
* evaluation (:meth:`Trainer.test`) when ``TEST.EVAL_PERIOD > 0`` divides ``i + 1``, except after
  the last iteration, where evaluation always runs once DATASETS.TEST is set. The RNG states are
  saved around evaluation, so evaluating does not change the training run;
* logging every ``log_period`` iterations and after the last one: a console line, a line in
  ``OUTPUT_DIR/metrics.json`` and TensorBoard scalars in OUTPUT_DIR (smoothed: median over the
  last ``log_period`` iterations, except ``lr``).

Resuming restores all of the state above and continues at ``iteration + 1``; the training loader
is rebuilt with ``start_iter = iteration + 1`` and must then yield exactly the batches an
uninterrupted run would have seen from that iteration on (its sampling and augmentation
randomness must come from its own seed and the sample position, not from the process' global
RNG consumed lazily). With that, an interrupted and resumed run reproduces the uninterrupted one.

Final evaluation results are written to ``OUTPUT_DIR/eval_results.json``: ``{task: {metric:
value}}`` for one test set, ``{dataset: {task: {metric: value}}}`` for several.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import inspect
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ..solver import build_gradient_clipper, build_lr_scheduler, build_optimizer
from ..utils.comm import all_gather, get_rank, get_world_size, is_main_process, synchronize
from ..utils.rng import get_rng_states, preserve_rng_states, resolve_seed, seed_all_rng, set_rng_states

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

LAST_CHECKPOINT_FILE = "last_checkpoint"
FINAL_CHECKPOINT_NAME = "model_final.pth"
METRICS_FILE = "metrics.json"
EVAL_RESULTS_FILE = "eval_results.json"


# ----------------------------------------------------------------------------- distributed
def init_distributed(use_cuda: Optional[bool] = None) -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1).

    NCCL when the processes train on CUDA (each on GPU ``LOCAL_RANK``), gloo on CPU. Returns whether
    a process group is in use. Calling it again is harmless.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    use_cuda = bool(use_cuda) and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    logger.info("Joined process group: rank %d of %d (local rank %d, backend %s)",
                dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    return True


# ----------------------------------------------------------------------------- files
def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, never leaving a partial file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / Infinity
    return value


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"sem_seg": {"mIoU": 50.1}}`` -> ``{"sem_seg/mIoU": 50.1}`` (numbers only)."""
    out: Dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_results(v, key + "/"))
        else:
            try:
                out[key] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def format_results_table(results: Mapping[str, Any]) -> str:
    """Evaluation results as an aligned text table, one row per metric."""
    rows = [(k, f"{v:.4f}") for k, v in flatten_results(results).items()]
    if not rows:
        return "(no evaluation results)"
    width = max(len("metric"), *(len(k) for k, _ in rows))
    vwidth = max(len("value"), *(len(v) for _, v in rows))
    line = "-" * (width + vwidth + 3)
    out = [line, f"{'metric'.ljust(width)} | {'value'.rjust(vwidth)}", line]
    out += [f"{k.ljust(width)} | {v.rjust(vwidth)}" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def write_eval_results(output_dir: str, results: Mapping[str, Any]) -> str:
    path = os.path.join(output_dir, EVAL_RESULTS_FILE)
    write_text_atomic(path, json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n")
    logger.info("Evaluation results written to %s", path)
    return path


# ----------------------------------------------------------------------------- metric writers
class _MetricsWriter:
    """metrics.json (one JSON object per line) and TensorBoard events in ``output_dir``.

    On (re)start, lines at or past ``start_iter`` (left by a run that was interrupted after its
    last checkpoint) and a torn last line are dropped, and TensorBoard purges the same steps.
    """

    _tb_warned = False

    def __init__(self, output_dir: str, start_iter: int, tensorboard: bool = True):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._prune(start_iter)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if not _MetricsWriter._tb_warned:
                    logger.warning("tensorboard is not installed: TensorBoard logging is disabled "
                                   "(pip install tensorboard)")
                    _MetricsWriter._tb_warned = True
            else:
                self._tb = SummaryWriter(log_dir=output_dir, purge_step=start_iter if start_iter > 0 else None,
                                         flush_secs=30)

    def _prune(self, start_iter: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for ln in lines:
            if not ln.endswith("\n"):
                continue  # torn write from a killed process
            try:
                it = json.loads(ln).get("iteration")
            except (ValueError, AttributeError):
                continue
            if isinstance(it, int) and it < start_iter:
                kept.append(ln)
        if len(kept) != len(lines):
            write_text_atomic(self.path, "".join(kept))

    def write(self, iteration: int, scalars: Mapping[str, float]) -> None:
        record = {"iteration": int(iteration)}
        record.update({k: _jsonable(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        if self._tb is not None:
            with contextlib.suppress(Exception):
                self._tb.close()


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``cfg``'s model; see the module docstring for the loop, files and resume contract.

    The pieces come from overridable class methods (:meth:`build_model`, :meth:`build_optimizer`,
    :meth:`build_lr_scheduler`, :meth:`build_train_loader`, :meth:`build_test_loader`,
    :meth:`build_evaluator`, :meth:`inference_on_dataset`). ``build_model`` (``fn(cfg)``) and
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
        self.rank, self.world_size = get_rank(), get_world_size()
        self.output_dir = cfg.OUTPUT_DIR
        if is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            _remove_stale_temp_files(self.output_dir)
            write_text_atomic(os.path.join(self.output_dir, "config.yaml"), cfg.dump())
        synchronize()

        # The run's seed: cfg.SEED, or one drawn now (shared by all ranks) when SEED < 0. It seeds
        # the data loader and, plus the rank, the global RNGs; checkpoints store it, so a resumed
        # run continues with the same data order whatever the config's SEED.
        self.seed = resolve_seed(cfg.SEED)
        seed_all_rng(self.seed + self.rank)
        logger.info("Rank %d of %d, seed %d", self.rank, self.world_size, self.seed)

        model = self._build_model(cfg)
        if dist.is_initialized() and not want_cuda and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            logger.warning("SyncBN needs CUDA in torch: CPU processes use per-process BatchNorm2d instead")
            model = _sync_bn_to_bn(model)
        self.model_without_ddp = model
        self.optimizer = self.build_optimizer(cfg, model)
        self.scheduler = self.build_lr_scheduler(cfg, self.optimizer)
        self.clipper = build_gradient_clipper(cfg)

        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.amp_enabled = bool(cfg.SOLVER.AMP.ENABLED)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = None
        if self.amp_enabled and self.device.type == "cuda":
            self.scaler = _make_grad_scaler()
        if self.amp_enabled:
            logger.info("Mixed precision: %s autocast on %s%s", str(self.amp_dtype).replace("torch.", ""),
                        self.device.type, " with a GradScaler" if self.scaler is not None else "")

        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (BN statistics) stay per-process after the initial sync, as in Detectron2.
            kwargs: Dict[str, Any] = {"find_unused_parameters": self.find_unused_parameters}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
                kwargs["forward_sync_buffers"] = False
            else:
                kwargs["broadcast_buffers"] = False
            if self.device.type == "cuda":
                kwargs["device_ids"] = [self.device.index if self.device.index is not None
                                        else torch.cuda.current_device()]
            self.model: nn.Module = DistributedDataParallel(model, **kwargs)
        else:
            self.model = model

        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        self.checkpoint_period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
        self.eval_period = int(cfg.TEST.EVAL_PERIOD)
        self.start_iter = 0
        self.iter = 0
        self._loaded = False
        self._pending_rng: Optional[Mapping[str, Any]] = None
        self._last_saved: Optional[str] = None
        self._writer: Optional[_MetricsWriter] = None
        self._pbar = None
        self._lr = float("nan")
        self._history: Dict[str, Deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=self.log_period))
        self._iter_times: Deque[float] = collections.deque(maxlen=1000)
        self.last_eval_results: Dict[str, Any] = {}

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

    def _build_model(self, cfg) -> nn.Module:
        return self._model_fn(cfg) if self._model_fn is not None else self.build_model(cfg)

    def _build_train_loader(self, cfg, start_iter: int) -> Iterable:
        # the loader sees the run's resolved seed as SEED, so that a run started with SEED < 0
        # and resumed draws the same batches
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SEED = int(self.seed)
        if self._loader_fn is not None:
            return self._loader_fn(cfg, start_iter)
        return self.build_train_loader(cfg, start_iter)

    # ------------------------------------------------------------------ evaluation
    @classmethod
    def test(cls, cfg, model: nn.Module, evaluators: Optional[List[Any]] = None) -> Dict[str, Any]:
        """Evaluate ``model`` on every DATASETS.TEST set.

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
            out_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(names) > 1:
                out_dir = os.path.join(out_dir, name)
            loader = cls.build_test_loader(cfg, name)
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, name, out_dir)
            res = cls.inference_on_dataset(model, loader, evaluator) or {}
            per_dataset[name] = dict(res)
            if is_main_process() and res:
                logger.info("Evaluation results for %s:\n%s", name, format_results_table(res))
        return per_dataset[names[0]] if len(names) == 1 else dict(per_dataset)

    def _do_eval(self, iteration: int) -> Dict[str, Any]:
        with preserve_rng_states():
            results = self.test(self.cfg, self.model_without_ddp)
        self.model.train()
        synchronize()
        self.last_eval_results = results
        if self._writer is not None and results:
            self._writer.write(iteration, flatten_results(results))
        return results

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
        """Restore model, optimizer, scheduler, scaler and RNG states from ``path``; returns the
        iteration stored in it. RNG states are applied when training starts."""
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
        rng = meta.get("rng_states")
        if isinstance(rng, (list, tuple)) and len(rng) == self.world_size and meta.get("world_size") == self.world_size:
            self._pending_rng = rng[self.rank]
        else:
            saved_ws = meta.get("world_size")
            logger.warning("%s holds RNG states for world size %s, not %d: RNG streams are reseeded "
                           "instead, so the run will not match an uninterrupted one", path, saved_ws, self.world_size)
            self._pending_rng = None
            seed_all_rng(self.seed + self.rank + int(meta["iteration"]) + 1)
        self._last_saved = path
        return int(meta["iteration"])

    def _checkpoint_state(self, iteration: int) -> Dict[str, Any]:
        rng_states = all_gather(get_rng_states())  # every rank takes part
        data: Dict[str, Any] = {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": int(iteration),
            "rng_states": rng_states,
            "world_size": self.world_size,
            "seed": int(self.seed),
        }
        if self.scaler is not None:
            data["scaler"] = self.scaler.state_dict()
        return data

    def _save(self, data: Mapping[str, Any], name: str) -> None:
        path = os.path.join(self.output_dir, name)
        save_checkpoint(dict(data), path)
        # Only now that the file is complete does last_checkpoint point at it.
        write_text_atomic(os.path.join(self.output_dir, LAST_CHECKPOINT_FILE), name + "\n")
        self._last_saved = path
        logger.info("Saved checkpoint %s", path)

    def _check_finite_params(self, iteration: int) -> None:
        for name, p in self.model_without_ddp.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise FloatingPointError(
                    f"Parameter {name} became infinite or NaN after iteration {iteration}; training "
                    f"stopped without saving. {self._last_good()}")

    def _last_good(self) -> str:
        if self._last_saved:
            return (f"The last good checkpoint is {self._last_saved} ({LAST_CHECKPOINT_FILE} is unchanged); "
                    "continue from it with --resume (e.g. after lowering SOLVER.BASE_LR or enabling "
                    "SOLVER.CLIP_GRADIENTS).")
        return "No checkpoint had been written yet."

    # ------------------------------------------------------------------ training
    def _autocast(self):
        if not self.amp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _reduce_losses(self, loss_dict: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        for k, v in loss_dict.items():
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise TypeError(f"the model's loss {k!r} is not a scalar tensor: {v!r}")
        vec = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
        if self.world_size > 1:
            dist.all_reduce(vec)
            vec = vec / self.world_size
        return dict(zip(loss_dict.keys(), vec.cpu().tolist()))

    def run_step(self) -> None:
        """One training iteration (``self.iter``)."""
        t0 = time.perf_counter()
        try:
            data = next(self._data_iter)
        except StopIteration:
            raise RuntimeError(f"the training data loader ran out at iteration {self.iter}; it must "
                               "yield batches indefinitely") from None
        data_time = time.perf_counter() - t0

        with self._autocast():
            loss_dict = self.model(data)
        if not isinstance(loss_dict, Mapping) or not loss_dict:
            raise TypeError(f"in training mode the model must return a non-empty dict of losses, got "
                            f"{type(loss_dict).__name__}")
        values = self._reduce_losses(loss_dict)
        if not all(math.isfinite(v) for v in values.values()):
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration {self.iter}: non-finite {', '.join(bad)} "
                f"(all terms: {terms}). Training stopped; this iteration was not applied or saved. "
                + self._last_good())
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(losses).backward()
        else:
            losses.backward()
        grad_norm = None
        if self.clipper is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = self.clipper(self.optimizer)
            if grad_norm is not None and self.scaler is None and not bool(torch.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"Gradient norm became {float(grad_norm)} at iteration {self.iter} (losses: "
                    + ", ".join(f"{k}={v:.6g}" for k, v in values.items())
                    + "). Training stopped; this iteration was not applied or saved. " + self._last_good())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[self._lr_group]["lr"]
        with warnings.catch_warnings():
            # A GradScaler skips optimizer.step() on overflow; the schedule still advances per iteration.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()

        step_time = time.perf_counter() - t0
        self._iter_times.append(step_time)
        hist = self._history
        hist["total_loss"].append(sum(values.values()))
        for k, v in values.items():
            hist[k].append(v)
        hist["time"].append(step_time)
        hist["data_time"].append(data_time)
        if grad_norm is not None:
            hist["grad_norm"].append(float(grad_norm))
        self._lr = float(lr)

    def _after_step(self) -> None:
        i = self.iter
        next_iter = i + 1
        final = next_iter == self.max_iter
        periodic = self.checkpoint_period > 0 and next_iter % self.checkpoint_period == 0
        if periodic or final:
            self._check_finite_params(i)
            data = self._checkpoint_state(i)
            if is_main_process():
                if periodic:
                    self._save(data, f"model_{i:07d}.pth")
                if final:
                    self._save(data, FINAL_CHECKPOINT_NAME)
            else:
                self._last_saved = os.path.join(self.output_dir, FINAL_CHECKPOINT_NAME if final
                                                else f"model_{i:07d}.pth")
        if self.eval_period > 0 and next_iter % self.eval_period == 0 and not final:
            self._do_eval(i)
        if next_iter % self.log_period == 0 or final:
            self._write_metrics(i)
        if self._pbar is not None:
            self._pbar.update(1)
            self._pbar.set_postfix(loss=f"{self._history['total_loss'][-1]:.4g}", lr=f"{self._lr:.3g}")

    def _write_metrics(self, i: int) -> None:
        if not is_main_process():
            return
        scalars: Dict[str, float] = {}
        for k, dq in self._history.items():
            if dq:
                scalars[k] = _median(dq)
        scalars["lr"] = self._lr
        eta = _median(self._iter_times) * (self.max_iter - i - 1)
        scalars["eta_seconds"] = eta
        if self.device.type == "cuda":
            scalars["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 1024 ** 2
        if self._writer is not None:
            self._writer.write(i, scalars)
        losses = "  ".join(f"{k}: {scalars[k]:.4g}" for k in self._history
                           if k not in ("time", "data_time", "grad_norm") and k in scalars)
        parts = [f"eta: {datetime.timedelta(seconds=int(eta))}", f"iter: {i}/{self.max_iter}", losses,
                 f"time: {scalars['time']:.4f}", f"data_time: {scalars['data_time']:.4f}", f"lr: {self._lr:.4g}"]
        if "grad_norm" in scalars:
            parts.append(f"grad_norm: {scalars['grad_norm']:.4g}")
        if "max_mem_mb" in scalars:
            parts.append(f"max_mem: {scalars['max_mem_mb']:.0f}M")
        logger.info("  ".join(parts))

    @property
    def _lr_group(self) -> int:
        # Report the lr of the group with the most parameter tensors (ties: the larger lr), which for
        # Mask2Former is BASE_LR's group rather than the backbone's.
        groups = self.optimizer.param_groups
        return max(range(len(groups)), key=lambda j: (len(groups[j]["params"]), groups[j]["lr"]))

    def train(self) -> Dict[str, Any]:
        """Train from ``start_iter`` to SOLVER.MAX_ITER, then evaluate; returns the final results."""
        if not self._loaded:
            self.resume_or_load(resume=False)
        start, max_iter = self.start_iter, self.max_iter
        self._writer = _MetricsWriter(self.output_dir, start, self._tensorboard) if is_main_process() else None
        self._pbar = None
        results: Dict[str, Any] = {}
        try:
            if start < max_iter:
                logger.info("Starting training from iteration %d to %d", start, max_iter)
                self._data_iter = iter(self._build_train_loader(self.cfg, start))
                if self._pending_rng is not None:
                    set_rng_states(self._pending_rng)
                    self._pending_rng = None
                self._pbar = self._make_pbar(start)
                self.model.train()
                t_start = time.perf_counter()
                for self.iter in range(start, max_iter):
                    self.run_step()
                    self._after_step()
                total = time.perf_counter() - t_start
                n = max_iter - start
                logger.info("Overall training speed: %d iterations in %s (%.4f s / it)", n,
                            datetime.timedelta(seconds=int(total)), total / max(n, 1))
            else:
                logger.info("Training already finished (iteration %d of %d)", start - 1, max_iter)
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            if list(self.cfg.DATASETS.TEST):
                results = self._do_eval(max_iter - 1)
                if is_main_process():
                    write_eval_results(self.output_dir, results)
        finally:
            if self._pbar is not None:
                self._pbar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return results

    def _make_pbar(self, start: int):
        enabled = self._progress_bar
        if enabled is None:
            enabled = is_main_process() and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        if not enabled:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.max_iter, initial=start, desc="train", dynamic_ncols=True)


# ----------------------------------------------------------------------------- helpers
def _remove_stale_temp_files(output_dir: str) -> None:
    """Delete temporary files that a killed run left behind while writing its outputs."""
    ours = (".model_", "." + LAST_CHECKPOINT_FILE + ".", "." + METRICS_FILE + ".", ".config.yaml.",
            "." + EVAL_RESULTS_FILE + ".")
    for name in os.listdir(output_dir):
        if name.startswith(ours) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(output_dir, name))
                logger.info("Removed %s, left by an interrupted write", name)


def _make_grad_scaler():
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


def _sync_bn_to_bn(module: nn.Module) -> nn.Module:
    """Replace SyncBatchNorm (CUDA only in torch) by BatchNorm2d for CPU process groups."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
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
