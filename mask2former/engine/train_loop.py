"""The training loop (:class:`TrainLoop`) and the interface of its hooks (:class:`HookBase`).

One step (:meth:`TrainLoop.run_step`, iteration ``trainer.iter``): ``batch = next(loader)``;
``loss_dict = model(batch)`` (under autocast when AMP is on: fp16 with a GradScaler on CUDA, bf16
without one on CPU); the loss terms are averaged over the ranks for reporting; a non-finite loss
stops training (:class:`FloatingPointError` naming the iteration and the terms) before anything
is updated or saved; backward; gradient clipping on unscaled gradients (a non-finite gradient
norm stops training the same way); ``optimizer.step()``; ``scheduler.step()``.

Everything else is a hook. :meth:`TrainLoop.train` calls, on every registered hook in turn:
``before_train()``; per iteration ``before_step()``, the step, ``after_step()``; and finally
``after_train()``, also when training failed (``trainer.completed`` says whether it finished).
Hooks run in ascending :attr:`HookBase.priority`, ties in registration order; so an EMA hook
(default priority) updates before the checkpointer saves the same step, and a best-checkpoint
hook (priority between evaluation's and the metrics writer's) sees that step's evaluation.

State: :meth:`TrainLoop.state_dict` is ``{"model", "optimizer", "scheduler", "scaler" (with a
GradScaler only), "iteration" (the step just done), "rng_states" (one entry per rank: python
``random``, numpy, torch CPU, CUDA when initialised, and "modules": the generators the model's
modules keep themselves, see :mod:`mask2former.utils.rng`), "hooks": {hook.name: state}}``; the
"hooks" entry holds the hooks whose :meth:`HookBase.state_dict` is not empty, and is left out when
there are none. States loaded by :meth:`TrainLoop.load_hooks_state` and RNG states put in
``pending_rng_states`` are applied when :meth:`TrainLoop.train` starts (the RNG states after the
loader is built), so that a resumed run continues exactly where the saved one was.

Step scalars: during a step, ``trainer.scalars`` maps a name to ``(value, smoothed)``; the step
puts ``total_loss``, every loss term, ``time``, ``data_time`` and ``grad_norm`` (with clipping),
hooks may add more (:meth:`TrainLoop.put_scalar`). Records for ``metrics.json`` made outside the
step (evaluation results) are queued with :meth:`TrainLoop.put_record` for the metrics writer.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..utils.comm import all_gather, get_rank, get_world_size
from ..utils.rng import get_rng_states, set_rng_states

__all__ = ["HookBase", "TrainLoop", "LAST_CHECKPOINT_FILE"]

logger = logging.getLogger(__name__)

#: text file in OUTPUT_DIR naming the newest complete checkpoint; what --resume continues from
LAST_CHECKPOINT_FILE = "last_checkpoint"


class HookBase:
    """Code run around the training loop; override any of the methods below.

    ``self.trainer`` is the :class:`TrainLoop` the hook is registered on (a weak proxy, so that
    the two do not keep each other alive). A hook whose :meth:`state_dict` returns a non-empty
    dict has it saved in every checkpoint under ``"hooks"`` / :attr:`name`, and gets it back
    through :meth:`load_state_dict` when training resumes from that checkpoint.
    """

    #: hooks run in ascending priority (ties: registration order). The default hooks use 10 (LR
    #: logging), 20 (checkpointing), 30 (evaluation), 40 (metrics writer), 50 (progress bar); the
    #: default 15 runs a new hook's after_step before the checkpoint of the same step is saved
    priority: int = 15
    trainer: "TrainLoop"

    @property
    def name(self) -> str:
        """Key of this hook's state in checkpoints; unique among hooks that have state."""
        return type(self).__qualname__

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError(f"hook {self.name} saved a state but does not implement load_state_dict")


def make_grad_scaler():
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


class TrainLoop:
    """Runs iterations ``start_iter`` to ``max_iter - 1`` of ``model`` with its hooks.

    ``loader(start_iter)`` returns an iterable that yields the batches of iterations
    ``start_iter, start_iter + 1, ...`` without end. ``model`` may be a DistributedDataParallel
    wrapper of ``model_without_ddp`` (whose state is saved). ``clipper(optimizer)`` clips the
    gradients and returns their norm (or None).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        loader: Callable[[int], Iterable],
        *,
        max_iter: int,
        model_without_ddp: Optional[nn.Module] = None,
        clipper: Optional[Callable[[torch.optim.Optimizer], Optional[torch.Tensor]]] = None,
        amp: bool = False,
    ):
        self.model = model
        self.model_without_ddp = model_without_ddp if model_without_ddp is not None else model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clipper = clipper
        self._loader = loader
        self.rank, self.world_size = get_rank(), get_world_size()

        param = next(self.model_without_ddp.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.amp_enabled = bool(amp)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = make_grad_scaler() if self.amp_enabled and self.device.type == "cuda" else None
        if self.amp_enabled:
            logger.info("Mixed precision: %s autocast on %s%s", str(self.amp_dtype).replace("torch.", ""),
                        self.device.type, " with a GradScaler" if self.scaler is not None else "")

        self.start_iter = 0
        self.max_iter = int(max_iter)
        self.iter = 0
        #: whether the last :meth:`train` call reached max_iter (read by hooks in after_train)
        self.completed = False
        #: path of the newest checkpoint of this run (written or resumed from), for error messages
        self.last_saved: Optional[str] = None
        self.last_eval_results: Dict[str, Any] = {}
        #: this process' RNG states to restore when training starts (set when resuming)
        self.pending_rng_states: Optional[Mapping[str, Any]] = None
        self.scalars: Dict[str, Tuple[float, bool]] = {}
        self.records: List[Tuple[int, Dict[str, float]]] = []
        self._hooks: List[HookBase] = []
        self._pending_hook_states: Dict[str, Any] = {}
        self._data_iter: Optional[Iterator] = None

    # ------------------------------------------------------------------ hooks
    def register_hooks(self, hooks: Sequence[Optional[HookBase]]) -> None:
        """Add ``hooks`` (None entries are skipped); see :attr:`HookBase.priority` for the order."""
        for h in hooks:
            if h is None:
                continue
            if not isinstance(h, HookBase):
                raise TypeError(f"register_hooks: {h!r} is not a HookBase")
            h.trainer = weakref.proxy(self)
            self._hooks.append(h)
        self._hooks.sort(key=lambda h: h.priority)  # stable: ties keep registration order

    @property
    def hooks(self) -> Tuple[HookBase, ...]:
        """The registered hooks, in the order they run."""
        return tuple(self._hooks)

    def _call_hooks(self, method: str) -> None:
        for h in self._hooks:
            getattr(h, method)()

    def _after_train(self) -> None:
        # Every hook gets its after_train (files are closed) even when an earlier one fails.
        error: Optional[BaseException] = None
        for h in self._hooks:
            try:
                h.after_train()
            except BaseException as e:  # noqa: B036 - re-raised below
                error = error or e
        if error is not None:
            raise error

    def put_scalar(self, name: str, value: float, smoothed: bool = True) -> None:
        """Report a scalar of the current step; ``smoothed`` ones are logged as a running median."""
        self.scalars[name] = (float(value), bool(smoothed))

    def put_record(self, iteration: int, scalars: Mapping[str, float]) -> None:
        """Queue a metrics.json record (e.g. evaluation results) for the metrics writer."""
        self.records.append((int(iteration), dict(scalars)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The training state after iteration ``self.iter`` (see the module docstring); every rank
        must call it, because the RNG states are gathered from all of them."""
        data: Dict[str, Any] = {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": int(self.iter),
            "rng_states": all_gather(get_rng_states(self.model_without_ddp)),
        }
        if self.scaler is not None:
            data["scaler"] = self.scaler.state_dict()
        hooks: Dict[str, Any] = {}
        for h in self._hooks:
            state = h.state_dict()
            if not state:
                continue
            if h.name in hooks:
                raise ValueError(f"two registered hooks with state are named {h.name!r}; give them "
                                 "distinct `name`s so that their checkpoint states do not collide")
            hooks[h.name] = state
        if hooks:
            data["hooks"] = hooks
        return data

    def load_hooks_state(self, states: Mapping[str, Any]) -> None:
        """Give each hook its entry of a checkpoint's ``"hooks"`` when training starts."""
        self._pending_hook_states = dict(states)

    def _apply_hook_states(self) -> None:
        states, self._pending_hook_states = self._pending_hook_states, {}
        by_name = {h.name: h for h in self._hooks}
        for name, state in states.items():
            if name in by_name:
                by_name[name].load_state_dict(state)
            else:
                logger.warning("The checkpoint holds a state for hook %r, which is not registered: "
                               "it is ignored", name)

    def resume_hint(self) -> str:
        """Where to continue from after training stopped on a non-finite value."""
        if self.last_saved:
            return (f"The last good checkpoint is {self.last_saved} ({LAST_CHECKPOINT_FILE} is unchanged); "
                    "continue from it with --resume (e.g. after lowering SOLVER.BASE_LR or enabling "
                    "SOLVER.CLIP_GRADIENTS).")
        return "No checkpoint had been written yet."

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        """Run iterations ``start_iter`` to ``max_iter - 1`` with the hooks around them."""
        start, max_iter = self.start_iter, self.max_iter
        self.completed = False
        self._apply_hook_states()
        try:
            self._call_hooks("before_train")
            if start < max_iter:
                logger.info("Starting training from iteration %d to %d", start, max_iter)
                self._data_iter = iter(self._loader(start))
                if self.pending_rng_states is not None:
                    set_rng_states(self.pending_rng_states, self.model_without_ddp)
                    self.pending_rng_states = None
                self.model.train()
                t_start = time.perf_counter()
                for self.iter in range(start, max_iter):
                    self.scalars = {}
                    self._call_hooks("before_step")
                    self.run_step()
                    self._call_hooks("after_step")
                total = time.perf_counter() - t_start
                n = max_iter - start
                logger.info("Overall training speed: %d iterations in %s (%.4f s / it)", n,
                            datetime.timedelta(seconds=int(total)), total / max(n, 1))
            else:
                logger.info("Training already finished (iteration %d of %d)", start - 1, max_iter)
            self.completed = True
        finally:
            self._after_train()

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
        """One training iteration (``self.iter``); see the module docstring."""
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
        terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        if not all(math.isfinite(v) for v in values.values()):
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration {self.iter}: non-finite {', '.join(bad)} "
                f"(all terms: {terms}). Training stopped; this iteration was not applied or saved. "
                + self.resume_hint())
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
            # Under a GradScaler a non-finite norm is an overflow: the scaler skips the step.
            if grad_norm is not None and self.scaler is None and not bool(torch.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"Gradient norm became {float(grad_norm)} at iteration {self.iter} (losses: {terms}). "
                    "Training stopped; this iteration was not applied or saved. " + self.resume_hint())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with warnings.catch_warnings():
            # A GradScaler skips optimizer.step() on overflow; the schedule still advances per iteration.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()

        self.put_scalar("total_loss", sum(values.values()))
        for k, v in values.items():
            self.put_scalar(k, v)
        self.put_scalar("time", time.perf_counter() - t0)
        self.put_scalar("data_time", data_time)
        if grad_norm is not None:
            self.put_scalar("grad_norm", float(grad_norm))
