"""Random seeds and RNG states: one place for drawing a run's seed, seeding the global RNGs,
and saving / restoring them (checkpoints, evaluation inside training, data mappers).

A negative or missing seed means "draw one": :func:`resolve_seed` takes it from the OS, shares
rank 0's value with every process, and logs it. Everything downstream then behaves exactly as if
that seed had been configured, which is what lets a resumed run with ``SEED -1`` reproduce the
uninterrupted one (the trainer stores the resolved seed in its checkpoints).

Modules that draw from generators of their own (not the global RNGs), such as kMaX-DeepLab's
pixel-sampling criterion, make them part of a run's RNG state by defining
``rng_state_dict() -> dict`` (tensors and plain values; empty when nothing has been drawn yet) and
``load_rng_state_dict(state)``. :func:`get_rng_states` and :func:`set_rng_states` given the model
save and restore them under ``"modules"``, by the module's qualified name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from . import comm

__all__ = [
    "resolve_seed",
    "seed_all_rng",
    "seeded_global_rngs",
    "get_rng_states",
    "set_rng_states",
    "preserve_rng_states",
]

logger = logging.getLogger(__name__)


def resolve_seed(seed: Optional[int], what: str = "seed") -> int:
    """``seed`` when it is >= 0; otherwise a fresh random seed in [0, 2**31), the same on every
    process (rank 0's), logged so that the run can be repeated."""
    if seed is not None and int(seed) >= 0:
        return int(seed)
    drawn = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if comm.get_world_size() > 1:
        drawn = int(comm.all_gather(drawn)[0])
    logger.info("Using a randomly drawn %s %d (set SEED %d to repeat this run)", what, drawn, drawn)
    return drawn


def seed_all_rng(seed: Optional[int] = None) -> int:
    """Seed python ``random``, numpy and torch (all devices); None or negative draws a fresh
    seed (:func:`resolve_seed`). Returns the seed used."""
    seed = resolve_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU global RNGs for a block; restore them afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def get_rng_states(model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """This process' RNG states, as tensors and plain Python values (``weights_only``-loadable);
    with ``model``, also those of its modules' own generators (``"modules"``, see above)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    if model is not None:
        states["modules"] = {name: state for name, module in model.named_modules()
                             if hasattr(module, "rng_state_dict") and (state := module.rng_state_dict())}
    return states


def set_rng_states(states: Mapping[str, Any], model: Optional[nn.Module] = None) -> None:
    """Restore what :func:`get_rng_states` returned (with ``model``, its modules' generators too)."""
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    keys = n["keys"].numpy() if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"])
    np.random.set_state((n["name"], keys.astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu())
    if model is not None:
        _load_module_rng_states(model, states.get("modules", {}))


def _load_module_rng_states(model: nn.Module, states: Mapping[str, Any]) -> None:
    modules = dict(model.named_modules())
    for name, state in states.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "load_rng_state_dict"):
            logger.warning("The saved RNG states hold a generator state for module %r, which this model does "
                           "not have (or which keeps no generator): it is ignored", name)
            continue
        module.load_rng_state_dict(state)


@contextlib.contextmanager
def preserve_rng_states() -> Iterator[None]:
    """Run a block without it affecting the RNG streams seen afterwards."""
    saved = get_rng_states()
    try:
        yield
    finally:
        set_rng_states(saved)
