"""The evaluator interface and the loop that runs a model over a dataset.

An evaluator is fed ``(inputs, outputs)`` batch by batch and summarises at the end::

    evaluator.reset()
    for inputs in loader:
        evaluator.process(inputs, model(inputs))
    results = evaluator.evaluate()   # {"panoptic_seg": {"PQ": 52.1, ...}, "sem_seg": {...}}

:func:`inference_on_dataset` is that loop, with eval mode, ``torch.inference_mode``, timing and a
progress log. In a distributed run every process calls it on its shard of the data; the
evaluators gather the per-process results onto rank 0, which returns the metrics (the other
ranks return ``{}``).
"""
from __future__ import annotations

import datetime
import logging
import sys
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..utils import comm

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "inference_context"]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Accumulates model outputs over a dataset and computes metrics.

    Subclasses implement:

    * :meth:`reset` — clear the state before a new round;
    * :meth:`process` — consume one batch: ``inputs`` is the list of dicts given to the model,
      ``outputs`` the list it returned (iterate over ``zip(inputs, outputs)``);
    * :meth:`evaluate` — return ``{task: {metric: value}}`` (on rank 0; other ranks may
      return ``{}`` or ``None``).
    """

    def reset(self) -> None:
        pass

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        pass

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        return {}


class DatasetEvaluators(DatasetEvaluator):
    """Runs several evaluators side by side and merges their results.

    Two evaluators reporting the same task name is an error (their metrics would overwrite
    each other).
    """

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        self._evaluators = list(evaluators)

    @property
    def evaluators(self) -> List[DatasetEvaluator]:
        return list(self._evaluators)

    def __len__(self) -> int:
        return len(self._evaluators)

    def reset(self) -> None:
        for e in self._evaluators:
            e.reset()

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for e in self._evaluators:
            e.process(inputs, outputs)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        results: Dict[str, Dict[str, float]] = OrderedDict()
        for e in self._evaluators:
            res = e.evaluate()
            if not comm.is_main_process() or not res:
                continue
            for task, metrics in res.items():
                if task in results:
                    raise KeyError(
                        f"Two evaluators report results for the same task {task!r} "
                        f"(second one: {type(e).__name__})"
                    )
                results[task] = metrics
        return results


@contextmanager
def inference_context(model: nn.Module):
    """Puts ``model`` in eval mode for the duration of the block, then restores its mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def inference_on_dataset(
    model: Any,
    data_loader: Iterable[List[dict]],
    evaluator: Union[DatasetEvaluator, Sequence[DatasetEvaluator], None],
    *,
    log_period: float = 5.0,
    use_tqdm: Optional[bool] = None,
) -> Dict[str, Dict[str, float]]:
    """Runs ``model`` on every batch of ``data_loader`` and evaluates the outputs.

    Args:
        model: a callable taking a batch (list of dicts) and returning a list of output dicts.
            An ``nn.Module`` is switched to eval mode during the run and restored afterwards.
            The model runs under ``torch.inference_mode()``.
        data_loader: iterable of batches; ``len(data_loader)`` (when defined) gives the ETA.
        evaluator: one evaluator, a list of them (combined with :class:`DatasetEvaluators`), or
            ``None`` to only run (and time) the model.
        log_period: seconds between progress log lines (when not showing a tqdm bar).
        use_tqdm: show a tqdm progress bar; default: when stderr is a terminal, tqdm is
            installed, and this is the main process.

    Returns:
        ``evaluator.evaluate()``: ``{task: {metric: value}}`` on the main process, ``{}`` on the
        others (and when there is no evaluator).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif not isinstance(evaluator, DatasetEvaluator):
        evaluator = DatasetEvaluators(list(evaluator))
    try:
        total: Optional[int] = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None

    num_devices = comm.get_world_size()
    logger.info("Start inference on %s batches", total if total is not None else "an unknown number of")
    evaluator.reset()

    if use_tqdm is None:
        use_tqdm = comm.is_main_process() and bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = None
    if use_tqdm:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="inference", unit="batch", dynamic_ncols=True)
        except ImportError:
            bar = None

    # The first few iterations (CUDA kernel selection, allocator warm-up) are excluded from
    # the per-iteration timings, as long as the dataset is long enough to leave some.
    num_warmup = min(5, total - 1) if total is not None else 5
    num_warmup = max(num_warmup, 0)
    start_time = time.perf_counter()
    data_time = compute_time = eval_time = 0.0
    last_log = time.perf_counter()
    num_iters = 0

    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.inference_mode())
        if bar is not None:
            stack.callback(bar.close)

        t_data = time.perf_counter()
        for idx, inputs in enumerate(data_loader):
            data_time += time.perf_counter() - t_data
            if idx == num_warmup:
                start_time = time.perf_counter()
                data_time = compute_time = eval_time = 0.0

            t0 = time.perf_counter()
            outputs = model(inputs)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            compute_time += t1 - t0
            evaluator.process(inputs, outputs)
            eval_time += time.perf_counter() - t1
            num_iters = idx + 1

            timed = idx + 1 - (num_warmup if idx >= num_warmup else 0)
            if bar is not None:
                bar.update(1)
            else:
                now = time.perf_counter()
                if now - last_log >= log_period or (total is not None and idx + 1 == total):
                    last_log = now
                    per_iter = (now - start_time) / timed
                    eta = (
                        f" ETA={_format_eta(per_iter * (total - idx - 1))}" if total is not None else ""
                    )
                    logger.info(
                        "Inference done %d/%s. Dataloading: %.4f s/iter. Inference: %.4f s/iter. "
                        "Eval: %.4f s/iter. Total: %.4f s/iter.%s",
                        idx + 1, total if total is not None else "?", data_time / timed,
                        compute_time / timed, eval_time / timed, per_iter, eta,
                    )
            t_data = time.perf_counter()

    total_time = time.perf_counter() - start_time
    timed_iters = max(num_iters - (num_warmup if num_iters > num_warmup else 0), 1)
    logger.info(
        "Total inference time: %s (%.6f s / iter per device, on %d devices)",
        datetime.timedelta(seconds=total_time), total_time / timed_iters, num_devices,
    )
    logger.info(
        "Total inference pure compute time: %s (%.6f s / iter per device, on %d devices)",
        datetime.timedelta(seconds=int(compute_time)), compute_time / timed_iters, num_devices,
    )

    results = evaluator.evaluate()
    return results if results is not None else {}
