"""Reading config YAML files without ever running code from them.

:func:`load_config_yaml` parses with a ``yaml.SafeLoader`` subclass in which every tag the safe
loader does not construct (``!!python/...``, ``tag:yaml.org,2002:python/...``, ``!custom``)
becomes an inert :class:`TaggedNode` placeholder holding the tag and the raw YAML node (its
arguments, unconstructed, and its position). A walk over the loaded data, which knows the dotted
key of every value (``INPUT.MIN_SIZE_TRAIN``, ``SOLVER.STEPS[1]``), then replaces each placeholder:

- ``!!python/object/apply:eval ["<expression>"]`` with ``allow_unsafe=True`` becomes the value of
  the expression computed by :func:`~mask2former.config.safe_eval.safe_eval` (literals,
  arithmetic, ``int``/``float``/``round``/``range`` and comprehensions; never Python's ``eval``);
- every other tag, and every python tag when ``allow_unsafe=False``, raises
  :class:`UnsafeConfigError` naming the file, the key, the YAML line and column and the tag.

Nothing from the file is imported, called or executed either way.
"""
from typing import Any, List, Set, Union

import yaml

from .safe_eval import SafeEvalError, safe_eval

__all__ = ["EVAL_TAG", "TaggedNode", "UnsafeConfigError", "load_config_yaml"]

_YAML_PREFIX = "tag:yaml.org,2002:"
EVAL_TAG = _YAML_PREFIX + "python/object/apply:eval"
_EVAL_EXAMPLE = '!!python/object/apply:eval ["[int(x * 0.1 * 640) for x in range(5, 21)]"]'


class UnsafeConfigError(ValueError):
    """A config file uses a YAML tag that would construct Python objects or run code."""


class TaggedNode:
    """Inert stand-in for a YAML node whose tag the safe loader does not construct."""

    __slots__ = ("tag", "node")

    def __init__(self, tag: str, node: yaml.Node):
        self.tag = tag
        self.node = node

    @property
    def shown_tag(self) -> str:
        """The tag as written in YAML shorthand (``!!python/...``)."""
        if self.tag.startswith(_YAML_PREFIX):
            return "!!" + self.tag[len(_YAML_PREFIX):]
        return self.tag

    @property
    def position(self) -> str:
        mark = self.node.start_mark
        return f"line {mark.line + 1}, column {mark.column + 1}"

    def __repr__(self) -> str:
        return f"TaggedNode({self.shown_tag!r} at {self.position})"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader whose fallback constructor records unknown tags instead of refusing them."""


# The None entry is the constructor for every tag without its own; SafeLoader's raises at once,
# before the key is known. add_constructor on the subclass leaves yaml.SafeLoader untouched.
_ConfigLoader.add_constructor(None, lambda loader, node: TaggedNode(node.tag, node))


def load_config_yaml(stream, filename: str, allow_unsafe: bool) -> Any:
    """The data of the YAML document in ``stream`` (read from ``filename``), tags resolved."""
    loader = _ConfigLoader(stream)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    return _Resolver(filename, allow_unsafe).resolve(data, [])


def _dotted(path: List[Union[str, int]]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Resolver:
    def __init__(self, filename: str, allow_unsafe: bool):
        self.filename = filename
        self.allow_unsafe = allow_unsafe
        self.seen: Set[int] = set()  # containers already walked: aliases and cycles walk once

    def error(self, tagged: TaggedNode, path, problem: str) -> UnsafeConfigError:
        return UnsafeConfigError(
            f"Config file '{self.filename}', key '{_dotted(path)}' ({tagged.position}): "
            f"YAML tag '{tagged.shown_tag}' {problem}")

    def resolve(self, value: Any, path: List[Union[str, int]]) -> Any:
        if isinstance(value, TaggedNode):
            return self.construct(value, path)
        if isinstance(value, tuple):  # from !!pairs / !!omap, or a sequence used as a key
            return tuple(self.resolve(item, path + [i]) for i, item in enumerate(value))
        if not isinstance(value, (dict, list, set)) or id(value) in self.seen:
            return value
        self.seen.add(id(value))
        if isinstance(value, dict):
            for key in list(value):
                self.refuse_inside_key(key, path)
                value[key] = self.resolve(value[key], path + [key])
        elif isinstance(value, list):
            for i, item in enumerate(value):
                value[i] = self.resolve(item, path + [i])
        else:
            for item in value:
                self.refuse_inside_key(item, path)
        return value

    def refuse_inside_key(self, key: Any, path) -> None:
        """Mapping keys and set members are hashable, so they cannot be replaced in place."""
        if isinstance(key, TaggedNode):
            raise self.error(key, path, "is refused in a mapping key or set member")
        if isinstance(key, tuple):
            for item in key:
                self.refuse_inside_key(item, path)

    def construct(self, tagged: TaggedNode, path) -> Any:
        if not tagged.tag.startswith(_YAML_PREFIX + "python/"):
            raise self.error(tagged, path, "is unknown: a config file may only use standard "
                                           "YAML types")
        if not self.allow_unsafe:
            raise self.error(tagged, path, "is an unsafe Python tag, refused because "
                                           "allow_unsafe=False")
        if tagged.tag != EVAL_TAG:
            raise self.error(tagged, path, "is refused: loading a config never constructs Python "
                                           f"objects or runs code; only {_EVAL_EXAMPLE} style "
                                           "expressions are accepted")
        node = tagged.node
        if not (isinstance(node, yaml.SequenceNode) and len(node.value) == 1
                and isinstance(node.value[0], yaml.ScalarNode)
                and node.value[0].tag == _YAML_PREFIX + "str"):
            raise self.error(tagged, path, "expects a one-item list holding the expression "
                                           f"string, e.g. {_EVAL_EXAMPLE}")
        expr = node.value[0].value
        try:
            return safe_eval(expr)
        except SafeEvalError as e:
            shown = expr if len(expr) <= 80 else expr[:77] + "..."
            raise self.error(tagged, path, f"expression {shown!r} refused: {e}") from e
