"""The default hooks of :class:`~mask2former.engine.trainer.Trainer`, in the order they run
(:attr:`~mask2former.engine.train_loop.HookBase.priority`); after iteration ``i`` (0-based):

* :class:`LRLogger` (10) records, before each step, the learning rate the step uses as ``lr``:
  that of the parameter group with the most tensors (ties: the larger lr), which for Mask2Former is
  BASE_LR's group rather than the backbone's;
* :class:`PeriodicCheckpointer` (20) saves ``model_{i:07d}.pth`` when ``(i + 1) % period == 0`` and
  ``model_final.pth`` after the last iteration (the trainer's ``state_dict()``, after checking that
  every parameter is finite). Files are written atomically and ``last_checkpoint`` (a text file
  with the file name) is rewritten, atomically, only once the checkpoint is complete;
* :class:`EvalHook` (30) evaluates when ``period > 0`` divides ``i + 1``, except after the last
  iteration, and once when training has finished (``final``), then writing
  ``eval_results.json``. RNG states are saved around evaluation, so it does not change training;
* :class:`MetricsWriter` (40) every ``log_period`` iterations and after the last one writes a
  console line, a line of ``metrics.json`` and TensorBoard scalars (smoothed scalars as the median
  over the last ``log_period`` iterations); queued records (evaluation results) are written as
  soon as they come. On (re)start, lines of metrics.json at or past ``start_iter`` (left by a run
  interrupted after its last checkpoint) and a torn last line are dropped;
* :class:`ProgressBar` (50): a tqdm bar, by default on rank 0 when stderr is a terminal.

None of them has state of its own: checkpoints of the default hooks have no "hooks" entry.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import math
import os
import statistics
import sys
from typing import Any, Callable, Deque, Dict, Mapping, Optional

import torch

from ..checkpoint import save_checkpoint
from ..utils.comm import is_main_process, synchronize
from ..utils.file_io import atomic_write
from ..utils.results import flatten_results, to_jsonable, write_eval_results
from ..utils.rng import preserve_rng_states
from .train_loop import LAST_CHECKPOINT_FILE, HookBase

__all__ = ["FINAL_CHECKPOINT_NAME", "METRICS_FILE", "LRLogger", "PeriodicCheckpointer", "EvalHook",
           "MetricsWriter", "ProgressBar"]

logger = logging.getLogger(__name__)

FINAL_CHECKPOINT_NAME = "model_final.pth"
METRICS_FILE = "metrics.json"


def _is_last(trainer) -> bool:
    return trainer.iter + 1 == trainer.max_iter


class LRLogger(HookBase):
    """Puts the learning rate of the upcoming step as the (unsmoothed) scalar ``lr``."""

    priority = 10

    def before_step(self) -> None:
        groups = self.trainer.optimizer.param_groups
        main = max(range(len(groups)), key=lambda j: (len(groups[j]["params"]), groups[j]["lr"]))
        self.trainer.put_scalar("lr", groups[main]["lr"], smoothed=False)


class PeriodicCheckpointer(HookBase):
    """Training checkpoints in ``output_dir`` every ``period`` iterations (0: none) and at the end."""

    priority = 20

    def __init__(self, output_dir: str, period: int):
        self.output_dir = output_dir
        self.period = int(period)

    def after_step(self) -> None:
        t = self.trainer
        i = t.iter
        names = [f"model_{i:07d}.pth"] if self.period > 0 and (i + 1) % self.period == 0 else []
        if _is_last(t):
            names.append(FINAL_CHECKPOINT_NAME)
        if not names:
            return
        self._check_finite_params(i)
        data = t.state_dict()  # every rank takes part
        if not is_main_process():
            t.last_saved = os.path.join(self.output_dir, names[-1])
            return
        for name in names:
            path = os.path.join(self.output_dir, name)
            save_checkpoint(data, path)
            # Only now that the file is complete does last_checkpoint point at it.
            atomic_write(os.path.join(self.output_dir, LAST_CHECKPOINT_FILE), name + "\n")
            t.last_saved = path
            logger.info("Saved checkpoint %s", path)

    def _check_finite_params(self, iteration: int) -> None:
        for name, p in self.trainer.model_without_ddp.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise FloatingPointError(
                    f"Parameter {name} became infinite or NaN after iteration {iteration}; training "
                    f"stopped without saving. {self.trainer.resume_hint()}")


class EvalHook(HookBase):
    """Calls ``eval_function()`` (-> results dict) every ``period`` iterations (0: never) and,
    with ``final``, once when training has finished, writing ``output_dir/eval_results.json``."""

    priority = 30

    def __init__(self, period: int, eval_function: Callable[[], Mapping[str, Any]], output_dir: str,
                 final: bool = True):
        self.period = int(period)
        self.eval_function = eval_function
        self.output_dir = output_dir
        self.final = bool(final)

    def evaluate(self, iteration: int) -> Dict[str, Any]:
        t = self.trainer
        with preserve_rng_states():
            results = self.eval_function()
        t.model.train()
        synchronize()
        t.last_eval_results = results
        if results:
            t.put_record(iteration, flatten_results(results))
        return results

    def after_step(self) -> None:
        t = self.trainer
        if self.period > 0 and (t.iter + 1) % self.period == 0 and not _is_last(t):
            self.evaluate(t.iter)

    def after_train(self) -> None:
        if not (self.final and self.trainer.completed):
            return
        results = self.evaluate(self.trainer.max_iter - 1)
        if is_main_process():
            write_eval_results(self.output_dir, results)


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


class MetricsWriter(HookBase):
    """Console lines, ``output_dir/metrics.json`` (one JSON object per line) and TensorBoard
    events in ``output_dir`` (when ``tensorboard`` and the package is installed); rank 0 only."""

    priority = 40
    _tb_warned = False

    def __init__(self, output_dir: str, log_period: int, tensorboard: bool = True):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.log_period = int(log_period)
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None
        self._history: Dict[str, Deque[float]] = {}
        self._latest: Dict[str, float] = {}
        self._times: Deque[float] = collections.deque(maxlen=1000)

    def before_train(self) -> None:
        if not is_main_process():
            return
        start = self.trainer.start_iter
        self._prune(start)
        self._file = open(self.path, "a")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if not MetricsWriter._tb_warned:
                    logger.warning("tensorboard is not installed: TensorBoard logging is disabled "
                                   "(pip install tensorboard)")
                    MetricsWriter._tb_warned = True
            else:
                self._tb = SummaryWriter(log_dir=self.output_dir, purge_step=start if start > 0 else None,
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
            atomic_write(self.path, "".join(kept))

    def write(self, iteration: int, scalars: Mapping[str, float]) -> None:
        """One metrics.json line (and TensorBoard scalars) for ``iteration``."""
        if self._file is None:
            return
        record = {"iteration": int(iteration)}
        record.update({k: to_jsonable(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)

    def _write_records(self) -> None:
        records, self.trainer.records = self.trainer.records, []
        for iteration, scalars in records:
            self.write(iteration, scalars)

    def after_step(self) -> None:
        t = self.trainer
        for k, (v, smoothed) in t.scalars.items():
            if smoothed:
                self._history.setdefault(k, collections.deque(maxlen=self.log_period)).append(v)
            else:
                self._latest[k] = v
        if "time" in t.scalars:
            self._times.append(t.scalars["time"][0])
        self._write_records()
        if (t.iter + 1) % self.log_period == 0 or _is_last(t):
            self._log(t.iter)

    def _log(self, i: int) -> None:
        if not is_main_process():
            return
        t = self.trainer
        scalars: Dict[str, float] = {k: _median(dq) for k, dq in self._history.items() if dq}
        scalars.update(self._latest)
        eta = _median(self._times) * (t.max_iter - i - 1)
        scalars["eta_seconds"] = eta
        if t.device.type == "cuda":
            scalars["max_mem_mb"] = torch.cuda.max_memory_allocated(t.device) / 1024 ** 2
        self.write(i, scalars)
        losses = "  ".join(f"{k}: {scalars[k]:.4g}" for k in self._history
                           if k not in ("time", "data_time", "grad_norm") and k in scalars)
        parts = [f"eta: {datetime.timedelta(seconds=int(eta))}", f"iter: {i}/{t.max_iter}", losses]
        parts += [f"{k}: {scalars[k]:.4f}" for k in ("time", "data_time") if k in scalars]
        if "lr" in scalars:
            parts.append(f"lr: {scalars['lr']:.4g}")
        if "grad_norm" in scalars:
            parts.append(f"grad_norm: {scalars['grad_norm']:.4g}")
        if "max_mem_mb" in scalars:
            parts.append(f"max_mem: {scalars['max_mem_mb']:.0f}M")
        logger.info("  ".join(parts))

    def after_train(self) -> None:
        try:
            self._write_records()
        finally:
            if self._file is not None:
                with contextlib.suppress(Exception):
                    self._file.close()
                self._file = None
            if self._tb is not None:
                with contextlib.suppress(Exception):
                    self._tb.close()
                self._tb = None


class ProgressBar(HookBase):
    """A tqdm progress bar with the loss and lr of the last step; ``enabled=None``: on rank 0 when
    stderr is a terminal (and tqdm is installed)."""

    priority = 50

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = enabled
        self._bar = None

    def before_train(self) -> None:
        t = self.trainer
        enabled = self.enabled
        if enabled is None:
            enabled = is_main_process() and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        if not enabled or t.start_iter >= t.max_iter:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=t.max_iter, initial=t.start_iter, desc="train", dynamic_ncols=True)

    def after_step(self) -> None:
        if self._bar is None:
            return
        s = self.trainer.scalars
        postfix = {"loss": f"{s['total_loss'][0]:.4g}"} if "total_loss" in s else {}
        if "lr" in s:
            postfix["lr"] = f"{s['lr'][0]:.3g}"
        self._bar.update(1)
        self._bar.set_postfix(**postfix)
        if _is_last(self.trainer):
            self.after_train()  # the bar is complete: close it before the final evaluation

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
