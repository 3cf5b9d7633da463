"""Registries that map the official component names (as written in configs) to classes."""
from typing import List, Optional

from fvcore.common.registry import Registry

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbones, keyed by MODEL.BACKBONE.NAME; called as fn(cfg, input_shape)."

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Meta architectures, keyed by MODEL.META_ARCHITECTURE; called as cls(cfg)."

SEM_SEG_HEADS_REGISTRY = Registry("SEM_SEG_HEADS")
SEM_SEG_HEADS_REGISTRY.__doc__ = "Segmentation heads, keyed by MODEL.SEM_SEG_HEAD.NAME; cls(cfg, input_shape)."

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = (
    "Pixel decoders, keyed by MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME; cls(cfg, input_shape)."
)

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = (
    "Transformer decoders, keyed by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME; "
    "cls(cfg, in_channels, mask_classification)."
)


class NamedRegistry(Registry):
    """A Registry whose entries can be registered under a name of their own.

    Config values such as ``INPUT.DATASET_MAPPER_NAME: mask_former_semantic`` are not the names of
    the classes they select, so ``register(obj, name=...)`` (or ``@register(name=...)``) is
    accepted besides fvcore's ``register(obj)`` / ``@register()``. Registering a name twice and
    looking up an unknown name raise ``KeyError`` naming the registry and its entries.
    ``registry[name]`` is ``registry.get(name)``.
    """

    def _do_register(self, name: str, obj) -> None:
        if name in self._obj_map:  # fvcore asserts, which ``python -O`` would skip
            raise KeyError(f"{name!r} is already registered in the {self._name} registry")
        self._obj_map[name] = obj

    def register(self, obj=None, *, name: Optional[str] = None):
        if name is None:
            return super().register(obj)
        if obj is None:
            def deco(func_or_class):
                self._do_register(name, func_or_class)
                return func_or_class

            return deco
        self._do_register(name, obj)
        return obj

    def get(self, name: str):
        if name not in self._obj_map:
            raise KeyError(f"no {name!r} in the {self._name} registry; registered: {self.names()}")
        return self._obj_map[name]

    __getitem__ = get

    def names(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self._obj_map)


DATASET_MAPPER_REGISTRY = NamedRegistry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = (
    "Dataset mappers, keyed by INPUT.DATASET_MAPPER_NAME; called as fn(cfg, is_train) and returning "
    "a callable dataset dict -> sample (see mask2former.data.dataset_mappers)."
)
