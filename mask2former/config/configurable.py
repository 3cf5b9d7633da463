"""`configurable`: let a class be built either from plain keyword arguments or from a config.

``Cls(a=1, b=2)`` calls ``__init__`` directly; ``Cls(cfg, *extra)`` (first argument a
``CfgNode``) calls ``Cls.from_config(cfg, *extra)`` and passes the returned dict as kwargs.
This mirrors the calling convention Detectron2's registries use, so the same classes can be
registered there unchanged.
"""
import functools
import inspect

from fvcore.common.config import CfgNode as _FvCfgNode


def _is_cfg(obj) -> bool:
    return isinstance(obj, _FvCfgNode)


def configurable(init_func):
    if not (inspect.isfunction(init_func) and init_func.__name__ == "__init__"):
        raise TypeError("@configurable decorates a class's __init__ method")

    @functools.wraps(init_func)
    def wrapped(self, *args, **kwargs):
        if args and _is_cfg(args[0]):
            from_config = getattr(type(self), "from_config", None)
            if from_config is None:
                raise AttributeError(f"{type(self).__name__} needs a from_config classmethod")
            explicit = from_config(*args, **kwargs)
            init_func(self, **explicit)
        else:
            init_func(self, *args, **kwargs)

    return wrapped
