"""Config node with `_BASE_` inheritance and error messages that name the key and the file.

Loading a config file never executes code from it. Files are parsed by
:func:`.safe_yaml.load_config_yaml` (built on ``yaml.SafeLoader``, never ``unsafe_load``):

- ``merge_from_file(path, allow_unsafe=True)`` (the default, as in Detectron2) accepts the one
  Python tag the official Mask2Former / SeMask configs use,
  ``!!python/object/apply:eval ["[int(x * 0.1 * 640) for x in range(5, 21)]"]``, and computes the
  string with :func:`.safe_eval.safe_eval`: literals, arithmetic and comparisons,
  ``int``/``float``/``round``/``range`` calls and comprehensions, with bounded size and work.
  Every other Python tag (``!!python/object/apply:os.system``, ``!!python/object/new:...``,
  ``!!python/name:...``, ``!!python/module:...``, ...), unknown tags and expressions outside
  that grammar raise :class:`UnsafeConfigError` (a ``ValueError``) naming the file, the dotted
  key, the YAML line/column and the tag.
- ``allow_unsafe=False`` (the default of ``load_yaml_with_base``) refuses every Python tag,
  the eval tag included.
"""
import copy
import difflib
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvCfgNode
from yacs.config import CfgNode as _YacsCfgNode

from .defaults import DEEPLAB_DEFAULTS, DETECTRON2_DEFAULTS, KMAX_DEEPLAB_DEFAULTS, MASKFORMER2_DEFAULTS
from .safe_yaml import UnsafeConfigError, load_config_yaml

__all__ = [
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "UnsafeConfigError",
    "get_cfg",
    "add_deeplab_config",
    "add_maskformer2_config",
    "add_kmax_deeplab_config",
    "image_size_hw",
]

logger = logging.getLogger(__name__)


class ConfigKeyError(KeyError):
    """A config file or override names a key that the config does not have."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, wrapping it in quotes.
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(ValueError):
    """A config value does not have the type of the key's default."""


class CfgNode(_FvCfgNode):
    """fvcore ``CfgNode`` with Detectron2's loading behaviour and precise errors.

    Like Detectron2, ``merge_from_file`` accepts the official configs'
    ``!!python/object/apply:eval`` tag by default (``allow_unsafe=True``), but computes it with
    the restricted evaluator of :mod:`.safe_eval` and refuses every other Python tag (see the
    module docstring); only VERSION 2 configs are accepted.
    Unknown keys raise :class:`ConfigKeyError` naming the dotted key, its source and the
    closest known key; type mismatches raise :class:`ConfigTypeError`.
    """

    # ---------------------------------------------------------------- loading YAML files
    @classmethod
    def _load_file_chain(
        cls, filename: str, allow_unsafe: bool, included_from: Optional[str] = None, _stack=()
    ) -> List[Tuple[str, Dict[str, Any]]]:
        """[(path, dict)] for ``filename`` and its `_BASE_` files, bases first, `_BASE_` removed."""
        if "://" not in filename and not os.path.isfile(filename):
            msg = f"Config file '{filename}' does not exist"
            if included_from is not None:
                msg += f" (referenced by _BASE_ in '{included_from}')"
            raise FileNotFoundError(msg)
        if filename in _stack:
            raise ValueError(f"Circular _BASE_ chain: {' -> '.join(_stack + (filename,))}")

        with cls._open_cfg(filename) as f:
            data = load_config_yaml(f, filename, allow_unsafe)
        if data is None:  # empty file
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"Config file '{filename}' must contain a YAML mapping at top level")

        bases = data.pop(BASE_KEY, None)
        if bases is None:
            bases = []
        elif isinstance(bases, str):
            bases = [bases]
        elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
            raise ValueError(f"_BASE_ in '{filename}' must be a path or a list of paths")

        chain = []
        for base in bases:
            base = os.path.expanduser(base)
            if "://" not in base and not os.path.isabs(base):
                # _BASE_ is relative to the including file, not to the working directory.
                base = os.path.normpath(os.path.join(os.path.dirname(filename), base))
            chain += cls._load_file_chain(base, allow_unsafe, filename, _stack + (filename,))
        chain.append((filename, data))
        return chain

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> Dict[str, Any]:
        """The file's dict with all its `_BASE_` files merged in (fvcore-compatible API)."""
        merged: Dict[str, Any] = {}
        for _, data in cls._load_file_chain(filename, allow_unsafe):
            _deep_update(merged, data)
        return merged

    # ---------------------------------------------------------------- merging
    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = True) -> None:
        """Merge a YAML file and, first, the `_BASE_` files it inherits from."""
        filename = os.fspath(cfg_filename)
        # Files are merged one at a time (bases first) so that errors can name the file.
        for path, data in self._load_file_chain(filename, allow_unsafe):
            version = data.get("VERSION")
            if version is not None and "VERSION" in self and version != self.VERSION:
                raise ValueError(
                    f"Config file '{path}' has VERSION {version}; only VERSION {self.VERSION} "
                    "configs are supported"
                )
            self._merge_dict(self, data, [], f"'{path}'")

    def merge_from_other_cfg(self, cfg_other) -> None:
        """Merge another CfgNode (or nested dict) into this one."""
        if BASE_KEY in cfg_other:
            raise ValueError(f"The reserved key '{BASE_KEY}' can only be used in files")
        self._merge_dict(self, cfg_other, [], "the merged config")

    def merge_from_list(self, cfg_list: List[Any]) -> None:
        """Merge ``[KEY, VALUE, KEY, VALUE, ...]`` (e.g. command-line ``opts``)."""
        if len(cfg_list) % 2 != 0:
            raise ValueError(f"merge_from_list expects KEY VALUE pairs, got odd length: {cfg_list}")
        self._check_mutable()
        source = "merge_from_list"
        for full_key, value in zip(cfg_list[0::2], cfg_list[1::2]):
            if full_key == BASE_KEY:
                raise ValueError(f"The reserved key '{BASE_KEY}' can only be used in files")
            if self.key_is_deprecated(full_key):
                logger.warning("Ignoring deprecated config key '%s'", full_key)
                continue
            if self.key_is_renamed(full_key):
                self.raise_key_rename_error(full_key)
            *parents, leaf = full_key.split(".")
            node = self
            for name in parents:
                node = node.get(name)
                if not isinstance(node, _YacsCfgNode):
                    raise self._unknown_key(full_key, source)
            if leaf not in node:
                if node.is_new_allowed():
                    node[leaf] = self._decode_cfg_value(value)
                    continue
                raise self._unknown_key(full_key, source)
            if isinstance(node[leaf], _YacsCfgNode):
                raise ConfigTypeError(
                    f"Config key '{full_key}' in {source} is a section; set its sub-keys instead"
                )
            new = self._decode_cfg_value(copy.deepcopy(value))
            node[leaf] = _coerce(new, node[leaf], full_key, source)

    def _merge_dict(self, node: _YacsCfgNode, src, prefix: List[str], source: str) -> None:
        self._check_mutable()
        for key, value in src.items():
            full_key = ".".join(prefix + [str(key)])
            if key not in node:
                if node.is_new_allowed():
                    node[key] = self._decode_cfg_value(copy.deepcopy(value))
                    continue
                if self.key_is_deprecated(full_key):
                    logger.warning("Ignoring deprecated config key '%s' in %s", full_key, source)
                    continue
                if self.key_is_renamed(full_key):
                    self.raise_key_rename_error(full_key)
                raise self._unknown_key(full_key, source)
            old = node[key]
            if isinstance(old, _YacsCfgNode):
                if not isinstance(value, dict):
                    raise ConfigTypeError(
                        f"Config key '{full_key}' in {source} is a section, got {value!r}"
                    )
                self._merge_dict(old, value, prefix + [str(key)], source)
            else:
                new = self._decode_cfg_value(copy.deepcopy(value))
                node[key] = _coerce(new, old, full_key, source)

    # ---------------------------------------------------------------- helpers
    def _check_mutable(self) -> None:
        if self.is_frozen():
            raise AttributeError("Cannot merge into a frozen config; call cfg.defrost() first")

    def _unknown_key(self, full_key: str, source: str) -> ConfigKeyError:
        msg = f"Unknown config key '{full_key}' in {source}"
        close = difflib.get_close_matches(full_key, list(_iter_keys(self)), n=1, cutoff=0.6)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        return ConfigKeyError(msg)


def _iter_keys(node: _YacsCfgNode, prefix: str = ""):
    """All dotted keys of a config tree: sections and leaves."""
    for key, value in node.items():
        full_key = prefix + str(key)
        yield full_key
        if isinstance(value, _YacsCfgNode):
            yield from _iter_keys(value, full_key + ".")


def _image_size(new: Any, old: Any, full_key: str, source: str) -> Any:
    """INPUT.IMAGE_SIZE: Mask2Former's LSJ configs give the side of the square training crop (an
    int), kMaX-DeepLab's the fixed [height, width] every input is padded to; either form loads."""
    if isinstance(new, (list, tuple)) and len(new) == 2 and all(type(v) is int and v > 0 for v in new):
        return list(new)
    if type(new) is int and new > 0:
        return new
    raise ConfigTypeError(
        f"Config key '{full_key}' in {source} expects a positive int (the LSJ crop side of Mask2Former's "
        f"configs, e.g. 1024) or [height, width] of positive ints (kMaX-DeepLab's input size, e.g. "
        f"[1281, 1281]); got {type(new).__name__} {new!r}")


# Keys whose value may take more than one form; each reader interprets the form it gets.
_SEVERAL_FORMS = {"INPUT.IMAGE_SIZE": _image_size}


def image_size_hw(value: Any, key: str = "INPUT.IMAGE_SIZE") -> Tuple[int, int]:
    """(height, width) of an INPUT.IMAGE_SIZE value: an int n is (n, n)."""
    value = _image_size(value, None, key, "the config")
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _coerce(new: Any, old: Any, full_key: str, source: str) -> Any:
    """``new`` converted to the type of ``old``: the rules of yacs, plus int -> float (and the
    forms of the keys of ``_SEVERAL_FORMS``)."""
    if full_key in _SEVERAL_FORMS:
        return _SEVERAL_FORMS[full_key](new, old, full_key, source)
    if isinstance(new, dict):
        pass  # a mapping can never replace a leaf value
    elif type(new) is type(old) or new is None or old is None:
        return new
    elif isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
        return type(old)(new)
    elif type(old) is float and type(new) is int:
        # yacs rejects e.g. "BASE_LR: 1"; widening is unambiguous.
        return float(new)
    raise ConfigTypeError(
        f"Config key '{full_key}' in {source} expects {type(old).__name__} "
        f"(current value {old!r}), got {type(new).__name__} {new!r}"
    )


def _deep_update(dst: Dict[str, Any], src: Dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def _add_defaults(node: _YacsCfgNode, defaults: Dict[str, Any], only_missing: bool = False) -> None:
    # Missing sections are created with the caller's node class, so a Detectron2 config stays one.
    # ``only_missing``: keys the node already has keep their values.
    for key, value in defaults.items():
        if isinstance(value, dict):
            if not isinstance(node.get(key), _YacsCfgNode):
                setattr(node, key, type(node)())
            _add_defaults(node[key], value, only_missing)
        elif not (only_missing and key in node):
            setattr(node, key, copy.deepcopy(value))


def add_deeplab_config(cfg: _YacsCfgNode) -> None:
    """Add the keys of Detectron2's DeepLab project, with their defaults, to any CfgNode."""
    _add_defaults(cfg, DEEPLAB_DEFAULTS)


def add_maskformer2_config(cfg: _YacsCfgNode) -> None:
    """Add the Mask2Former keys, with their defaults, to any CfgNode."""
    _add_defaults(cfg, MASKFORMER2_DEFAULTS)


def add_kmax_deeplab_config(cfg: _YacsCfgNode) -> None:
    """What the official ``add_kmax_deeplab_config`` does: add the kMaX-DeepLab keys and set the
    keys it shares with Mask2Former (INPUT.IMAGE_SIZE, SOLVER.WEIGHT_DECAY_EMBED, ...) to kMaX's
    defaults."""
    _add_defaults(cfg, KMAX_DEEPLAB_DEFAULTS)


def get_cfg() -> CfgNode:
    """A fresh full default config: Detectron2 defaults + DeepLab + Mask2Former keys, and the
    kMaX-DeepLab keys that Mask2Former lacks (shared keys keep Mask2Former's defaults)."""
    cfg = CfgNode(DETECTRON2_DEFAULTS)
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    _add_defaults(cfg, KMAX_DEEPLAB_DEFAULTS, only_missing=True)
    return cfg
