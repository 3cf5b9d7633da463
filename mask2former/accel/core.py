"""How accelerations attach to a model, when they run, and how they prove themselves.

An acceleration is a subclass of one plain module class of ``modeling/`` or ``layers/`` that adds
no parameters, buffers or submodules: it overrides a method to reach bitwise the same result by a
faster route where it can, and calls the plain method otherwise. :func:`set_fast_inference` swaps
each eligible module's class to its accelerated subclass, or back; the module object, its
parameters, state-dict keys, hooks and references stay what they were. With fast inference off a
model is made of plain classes only, so none of this package's code runs.

Eligibility is decided at two moments:

* once, when swapping: an acceleration's ``eligible(module)`` looks at what cannot change while
  the model serves (its structure, whether the compiled kernels it needs exist);
* per call, :func:`inference_active`: eval mode and autograd off. Accelerations that need more of
  their inputs (CPU float32, a memory layout) check that beside it.

Accelerations whose exactness rests on a library's choices (oneDNN's memory layouts, a BLAS
computing each column of a product independently) verify it: :class:`VerifiedOnce` runs the plain
and the fast computation on the first call for each key (an input shape and whatever else the
result depends on), keeps the verdict, and afterwards runs the fast one only where it matched.

Per-module state of the accelerations (verdicts, the owner of scratch buffers) lives in a weak
map beside the module, never on it: copying, pickling or saving a model does not carry it, and
switching fast inference off drops it.
"""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import Any, Callable, Dict, Hashable, Optional, Tuple, Type

import torch
from torch import nn

__all__ = [
    "accelerates",
    "set_fast_inference",
    "fast_inference_enabled",
    "inference_active",
    "plain_type",
    "VerifiedOnce",
    "verified",
    "scratch_owner",
    "module_state",
]

logger = logging.getLogger(__name__)

# plain class -> (accelerated subclass, static eligibility check or None)
_FAST: Dict[type, Tuple[type, Optional[Callable[[nn.Module], bool]]]] = {}
_PLAIN: Dict[type, type] = {}  # accelerated subclass -> plain class

_state: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Any]]" = weakref.WeakKeyDictionary()
_state_lock = threading.Lock()


def accelerates(plain: type, eligible: Optional[Callable[[nn.Module], bool]] = None):
    """Class decorator: register the decorated subclass of ``plain`` as its acceleration.
    Only modules whose type is exactly ``plain`` are swapped (a user's subclass may change what
    the acceleration relies on); ``eligible(module)`` can refuse one when swapping."""

    def register(fast: Type[nn.Module]) -> Type[nn.Module]:
        if not issubclass(fast, plain) or "__init__" in vars(fast):
            # swapped onto built modules: it cannot add state through a constructor
            raise TypeError(f"{fast.__name__} must derive from {plain.__name__} without its own __init__")
        if plain in _FAST:
            raise ValueError(f"{plain.__name__} already has an acceleration: {_FAST[plain][0].__name__}")
        _FAST[plain] = (fast, eligible)
        _PLAIN[fast] = plain
        return fast

    return register


def plain_type(module: nn.Module) -> type:
    """The plain class of ``module``, whether or not it is accelerated."""
    return _PLAIN.get(type(module), type(module))


def set_fast_inference(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Swap every eligible module of ``model`` to its accelerated class (``enabled``), or every
    accelerated one back to its plain class. Returns ``model``."""
    enabled = bool(enabled)
    with _state_lock:
        for m in model.modules():
            cls = type(m)
            if enabled:
                fast, eligible = _FAST.get(cls, (None, None))
                if fast is not None and (eligible is None or eligible(m)):
                    m.__class__ = fast
                    _state[m] = {"root": weakref.ref(model)}
            elif cls in _PLAIN:
                m.__class__ = _PLAIN[cls]
                _state.pop(m, None)
    return model


def fast_inference_enabled(model: nn.Module) -> bool:
    """Whether any module of ``model`` is accelerated."""
    return any(type(m) in _PLAIN for m in model.modules())


def inference_active(module: nn.Module) -> bool:
    """The one per-call condition of every acceleration: eval mode with autograd off (no_grad or
    inference_mode), where nothing needs the intermediate tensors the plain path keeps."""
    return not module.training and not torch.is_grad_enabled()


def module_state(module: nn.Module) -> Dict[str, Any]:
    """The accelerations' state kept beside ``module`` (a dict, dropped with the module or when
    fast inference is switched off)."""
    with _state_lock:
        st = _state.get(module)
        if st is None:  # accelerated by a class swap made outside set_fast_inference
            st = _state[module] = {"root": weakref.ref(module)}
        return st


def scratch_owner(module: nn.Module) -> nn.Module:
    """The module that owns scratch buffers for ``module``: the model that fast inference was
    switched on for, so that its submodules share buffers (see ``accel.cpu.scratch``)."""
    root = module_state(module)["root"]()
    return module if root is None else root


class VerifiedOnce:
    """Per key, whether a fast computation gave bitwise the plain one's result; at most
    ``maxsize`` keys (least recently used dropped, to be verified again if seen again)."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = int(maxsize)
        self._verdicts: "collections.OrderedDict[Hashable, bool]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._verdicts)

    def verdicts(self) -> Dict[Hashable, bool]:
        with self._lock:
            return dict(self._verdicts)

    def clear(self) -> None:
        with self._lock:
            self._verdicts.clear()

    def run(self, key: Hashable, fast: Callable[[], Any], plain: Callable[[], Any],
            same: Callable[[Any, Any], bool]) -> Any:
        """``fast()`` where ``key`` verified; ``plain()`` where it failed. An unseen key runs both,
        records ``same(fast_result, plain_result)`` and returns the plain result."""
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
        if verdict is True:
            return fast()
        if verdict is False:
            return plain()
        want = plain()
        exact = bool(same(fast(), want))
        if not exact:
            logger.info("fast inference: no bitwise match for %s; the plain computation runs there", key)
        with self._lock:
            self._verdicts[key] = exact
            while len(self._verdicts) > self.maxsize:
                self._verdicts.popitem(last=False)
        return want


def verified(module: nn.Module) -> VerifiedOnce:
    """The verdicts of ``module``'s acceleration (created on first use, dropped when fast
    inference is switched off)."""
    st = module_state(module)
    with _state_lock:
        return st.setdefault("verified", VerifiedOnce())
