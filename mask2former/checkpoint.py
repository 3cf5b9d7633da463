"""Reading, loading and atomically saving checkpoints, without Detectron2.

Supported inputs:

* model-zoo ``.pkl``: ``{"model": {name: np.ndarray}, "__author__": ..., ["matching_heuristics": True]}``
  (also Python-2 pickles and ``.pkl`` files holding a bare ``{name: array}`` dict);
* ImageNet backbone ``.pkl`` converted to Detectron2 names, whose keys lack the ``backbone.`` prefix;
* torch files (``.pth`` etc.): ``{"model": state_dict, "optimizer": ..., ...}`` or a bare state dict.

Pickles are never trusted: ``.pkl`` files go through an allow-list unpickler that can only build
dicts and numpy arrays, and torch files are read with ``torch.load(weights_only=True)`` only.
Saving goes through :func:`mask2former.utils.file_io.atomic_write`.
"""
from __future__ import annotations

import codecs
import collections
import errno
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .utils.file_io import atomic_write

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "LoadResult",
    "read_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_LOGGER_NAME = "mask2former.checkpoint"
_PKL_SUFFIXES = (".pkl", ".pickle")
_ZIP_MAGIC = b"PK\x03\x04"
# First object pickled by torch.save's legacy (non-zip) format.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_NBT = "num_batches_tracked"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that references code other than plain containers and arrays."""


# ----------------------------------------------------------------------------- restricted unpickler
def _numpy_multiarray():
    # numpy >= 2 moved the module to numpy._core; pickles from either version name their own one.
    try:
        from numpy._core import multiarray  # type: ignore[attr-defined]
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    ma = _numpy_multiarray()
    allowed: Dict[Tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol <3 pickles encode bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(pkg + ".multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(pkg + ".multiarray", "scalar")] = ma.scalar
        # Protocol-5 pickles rebuild arrays as _frombuffer(bytes, dtype, shape, order).
        allowed[(pkg + ".numeric", "_frombuffer")] = _frombuffer
    # Plain data types only: nothing that can call, import or reach attributes.
    for t in (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool):
        allowed[("builtins", t.__name__)] = t
    return allowed


def _frombuffer(buf, dtype, shape, order):
    # Same contract as numpy's private helper, re-implemented so nothing private is imported.
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # latin1 lets numpy rebuild arrays whose raw data was a Python-2 str.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._path}: it references {module}.{name}, which is not an "
                "array/dict type; model-zoo checkpoints only contain numpy arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"cannot read {self._path} as a plain pickle: it holds torch storages (a torch.save "
            "file); give it a .pth suffix so it is read with torch.load(weights_only=True)"
        )


# ----------------------------------------------------------------------------- reading
def _corrupt(path: str, err: BaseException, detail: Optional[str] = None) -> CheckpointError:
    detail = detail or f"{type(err).__name__}: {err}"
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({detail}); re-download or re-save it")


def _load_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError, UnicodeError) as e:
        raise _corrupt(path, e) from e


def _load_torch(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only also fails on garbage opcodes; only a refused global means unsafe content.
        detail = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), "")
        if detail:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: torch.load(weights_only=True) rejected it ({detail})"
                ". It contains objects other than tensors and plain containers. If you trust its "
                "source, re-save only tensors, e.g. torch.save({'model': model.state_dict()}, path)"
            ) from None
        # Keep torch's own line only: its message also suggests weights_only=False, which we never do.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("Unsupported", "Ran out"))]
        raise _corrupt(path, e, lines[0] if lines else "unreadable pickle data") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _corrupt(path, e) from e


def _to_tensor(path: str, key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.generic, int, float, bool)):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise CheckpointError(f"{path}: {key!r} is an array of dtype {value.dtype}, not numbers")
        # Copy into native byte order: torch cannot wrap big-endian or shared pickle buffers.
        arr = np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True)
        return torch.from_numpy(arr)
    raise CheckpointError(f"{path}: {key!r} holds a {type(value).__name__}, not an array or tensor")


def _is_array_like(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray, np.generic))


def read_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read ``path`` into ``(state_dict of CPU tensors, meta)`` without running code from it.

    ``meta`` holds ``source_format``, ``matching_heuristics`` (bool) and every top-level entry of
    the file other than the weights (``__author__``, ``optimizer``, ``iteration``, ...).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file does not exist", path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or corrupt")
    is_pkl = path.lower().endswith(_PKL_SUFFIXES) and not head.startswith(_ZIP_MAGIC)

    data = _load_pickle(path) if is_pkl else _load_torch(path)
    if is_pkl and isinstance(data, int) and data == _TORCH_LEGACY_MAGIC:
        is_pkl, data = False, _load_torch(path)  # legacy torch.save file under a .pkl name

    kind = "pkl" if is_pkl else "torch"
    if not isinstance(data, dict):
        raise CheckpointError(
            f"checkpoint {path} contains a {type(data).__name__}; expected a dict of weights "
            "(a state dict, or a dict with a 'model' entry)"
        )
    if isinstance(data.get("model"), dict):
        weights, meta = data["model"], {k: v for k, v in data.items() if k != "model"}
        fmt = "model_zoo_pkl" if kind == "pkl" else "torch_checkpoint"
    elif "model" not in data and isinstance(data.get("state_dict"), dict):  # mmcv / Lightning style
        weights, meta = data["state_dict"], {k: v for k, v in data.items() if k != "state_dict"}
        fmt = "model_zoo_pkl" if kind == "pkl" else "torch_checkpoint"
    elif "model" in data:
        raise CheckpointError(
            f"checkpoint {path}: its 'model' entry is a {type(data['model']).__name__}, expected a dict of weights"
        )
    elif "blobs" in data:
        raise CheckpointError(f"checkpoint {path} is a Caffe2/Detectron1 file ('blobs'), which is not supported")
    else:
        weights, meta = data, {}
        fmt = "pkl_state_dict" if kind == "pkl" else "torch_state_dict"
        bad = [k for k, v in data.items() if k != "_metadata" and not _is_array_like(v)]
        if bad:
            raise CheckpointError(
                f"checkpoint {path} has no 'model' entry and is not a state dict: "
                f"{len(bad)} entries are not arrays/tensors, e.g. {bad[:5]}"
            )

    state: Dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        if k == "_metadata" and not _is_array_like(v):
            continue  # torch's module-version metadata; we load by key names only
        if not isinstance(k, str):
            raise CheckpointError(f"checkpoint {path}: weight name {k!r} is not a string")
        state[k] = _to_tensor(path, k, v)
    meta["source_format"] = fmt
    meta["matching_heuristics"] = bool(meta.get("matching_heuristics", False))
    return state, meta


# ----------------------------------------------------------------------------- name matching
def _suffix_match(
    model_keys: List[str], ckpt_keys: Iterable[str]
) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """Map checkpoint keys lacking a module prefix onto model keys ending with ``"." + key``.

    A model key claimed by several checkpoint keys goes to the longest (most specific) one. When a
    single prefix (e.g. ``backbone.``) explains the most keys, only matches under it are accepted, so
    stray classifier keys such as ``norm.weight`` do not land in unrelated heads. Otherwise several
    candidates resolve to the unique shortest; ties are returned as ambiguous.
    """
    by_suffix: Dict[str, List[str]] = collections.defaultdict(list)
    for m in model_keys:
        parts = m.split(".")
        for i in range(1, len(parts)):
            by_suffix[".".join(parts[i:])].append(m)
    cands = {k: list(by_suffix.get(k, ())) for k in ckpt_keys}

    owner: Dict[str, str] = {}
    for k, ms in cands.items():
        for m in ms:
            if m not in owner or len(k) > len(owner[m]):
                owner[m] = k
    cands = {k: [m for m in ms if owner[m] == k] for k, ms in cands.items()}

    votes = collections.Counter(m[: len(m) - len(k)] for k, ms in cands.items() for m in ms)
    top = votes.most_common(2)
    dominant = top[0][0] if top and (len(top) == 1 or top[0][1] > top[1][1]) else None

    mapping: Dict[str, str] = {}
    ambiguous: Dict[str, List[str]] = {}
    for k, ms in cands.items():
        if dominant is not None:
            ms = [m for m in ms if m == dominant + k]
        if not ms:
            continue
        shortest = min(len(m) for m in ms)
        best = [m for m in ms if len(m) == shortest]
        if len(best) == 1:
            mapping[k] = best[0]
        else:
            ambiguous[k] = sorted(ms)
    return mapping, ambiguous


# ----------------------------------------------------------------------------- reporting
def _group_keys(keys: Iterable[str], max_lines: int = 20) -> List[str]:
    """Summarise keys in at most ``max_lines`` lines, as finely as that budget allows."""
    keys = sorted(keys)
    if not keys:
        return []
    split = [k.split(".") for k in keys]
    depth_max = max(len(s) for s in split)
    chosen: Dict[str, List[str]] = {}
    for depth in range(1, depth_max + 1):
        groups: Dict[str, List[str]] = collections.OrderedDict()
        for k, s in zip(keys, split):
            groups.setdefault(".".join(s[:depth]), []).append(k)
        if chosen and len(groups) > max_lines:
            break
        chosen = groups
    # Single keys sharing a parent module are written together: "head.{bias,weight}".
    order: List[Tuple[bool, str]] = []  # (is_parent_of_singles, group prefix or parent name)
    singles: Dict[str, List[str]] = {}
    for prefix, ks in chosen.items():
        if len(ks) > 1:
            order.append((False, f"{prefix}.* ({len(ks)} keys)"))
            continue
        parent, _, leaf = ks[0].rpartition(".")
        if parent not in singles:
            singles[parent] = []
            order.append((True, parent))
        singles[parent].append(leaf)
    lines: List[str] = []
    for is_parent, text in order:
        if not is_parent:
            lines.append(text)
        elif not text:  # top-level keys without a module
            lines.extend(singles[text])
        else:
            leaves = singles[text]
            lines.append(f"{text}.{leaves[0]}" if len(leaves) == 1 else f"{text}.{{{','.join(leaves)}}}")
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... and {len(lines) - max_lines} more groups"]
    return lines


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did. Key lists use model names (missing/loaded) or checkpoint
    names (unexpected); ``renamed`` maps checkpoint -> model names changed by suffix matching."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    loaded_keys: List[str]
    source_format: str
    path: str = ""
    renamed: Dict[str, str] = field(default_factory=dict)
    ambiguous: Dict[str, List[str]] = field(default_factory=dict)
    skipped_shapes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = ", name-matching heuristics" if self.renamed else ""
        out = [f"Loaded {len(self.loaded_keys)} tensors from {self.path} ({self.source_format}{how})"]
        sections = [
            ("Missing in checkpoint (model keys left as initialised)", self.missing_keys),
            ("Unexpected in checkpoint (not loaded)", self.unexpected_keys),
        ]
        for title, keys in sections:
            if keys:
                out.append(f"{title}: {len(keys)}")
                out.extend("  " + ln for ln in _group_keys(keys))
        if self.ambiguous:
            out.append(f"Ambiguous checkpoint keys (not loaded): {len(self.ambiguous)}")
            out.extend(f"  {k} -> one of {v}" for k, v in sorted(self.ambiguous.items()))
        if self.skipped_shapes:
            out.append(f"Skipped for shape/dtype mismatch: {len(self.skipped_shapes)}")
            out.extend("  " + s for s in self.skipped_shapes)
        return "\n".join(out)


# ----------------------------------------------------------------------------- loading
def _describe_mismatch(ck: str, mk: str, value: torch.Tensor, ref: torch.Tensor) -> Optional[str]:
    name = ck if ck == mk else f"{ck} -> {mk}"
    if tuple(value.shape) != tuple(ref.shape):
        return f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(ref.shape)}"
    # Casting a float into an integer/bool buffer would silently truncate.
    if not (ref.is_floating_point() or ref.is_complex()) and (value.is_floating_point() or value.is_complex()):
        return f"{name}: checkpoint dtype {value.dtype} vs model {ref.dtype}"
    return None


def load_checkpoint(
    model: nn.Module,
    path,
    *,
    strict_shapes: bool = True,
    logger: Optional[logging.Logger] = None,
) -> LoadResult:
    """Load weights from ``path`` into ``model`` (all-or-nothing) and report what did not fit.

    Names are matched exactly; for backbone-only files (``matching_heuristics`` set, or fewer than
    half the names matching exactly) unmatched checkpoint names are matched as suffixes of model
    names. Any shape mismatch raises :class:`CheckpointError` before anything is copied, unless
    ``strict_shapes=False``, which skips those tensors instead.
    """
    log = logger or logging.getLogger(_LOGGER_NAME)
    path = os.fspath(path)
    state, meta = read_checkpoint(path)
    fmt = meta["source_format"]
    model_state = model.state_dict()
    model_keys = list(model_state.keys())

    # DataParallel/DDP-saved weights carry a "module." prefix the bare model lacks.
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in model_keys):
        state = {k[len("module."):]: v for k, v in state.items()}

    mapping = {k: k for k in state if k in model_state}
    renamed: Dict[str, str] = {}
    ambiguous: Dict[str, List[str]] = {}
    if len(mapping) < len(state):
        free = [m for m in model_keys if m not in mapping]
        extra, amb = _suffix_match(free, [k for k in state if k not in mapping])
        if meta["matching_heuristics"] or len(mapping) * 2 < len(state):
            renamed, ambiguous = extra, amb
            mapping.update(extra)

    problems, skipped = [], set()
    for ck, mk in mapping.items():
        msg = _describe_mismatch(ck, mk, state[ck], model_state[mk])
        if msg:
            problems.append(msg)
            skipped.add(ck)
    if problems and strict_shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model; nothing was loaded. "
            f"{len(problems)} mismatched tensors:\n  " + "\n  ".join(problems)
        )

    to_load = {
        mk: state[ck].to(model_state[mk].dtype) for ck, mk in mapping.items() if ck not in skipped
    }
    incompatible = model.load_state_dict(to_load, strict=False)
    if incompatible.unexpected_keys:  # cannot happen unless a module's loader renames keys
        raise CheckpointError(f"{path}: model rejected keys {incompatible.unexpected_keys}")

    used = set(mapping) - skipped
    loaded = [m for m in model_keys if m in to_load]
    # BN checkpoints without num_batches_tracked, and FrozenBN models without it, are both normal.
    missing = [m for m in model_keys if m not in to_load and not m.endswith("." + _NBT)]
    unexpected = [k for k in state if k not in used and not (k.endswith("." + _NBT) and k not in skipped)]
    result = LoadResult(
        missing_keys=missing,
        unexpected_keys=unexpected,
        loaded_keys=loaded,
        source_format=fmt,
        path=path,
        renamed={k: v for k, v in renamed.items() if k != v},
        ambiguous=ambiguous,
        skipped_shapes=problems,
    )
    if meta.get("__author__"):
        log.info("Checkpoint %s was written by %r", path, meta["__author__"])
    if missing or unexpected or ambiguous or problems:
        log.warning("%s", result)
    else:
        log.info("%s", result)
    log.debug("missing: %s\nunexpected: %s\nrenamed: %s", missing, unexpected, result.renamed)
    return result


# ----------------------------------------------------------------------------- saving
def save_checkpoint(obj: Any, path) -> None:
    """``torch.save(obj, path)`` atomically: the old file is replaced only by a complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))
