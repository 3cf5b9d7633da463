"""Register this package's model and datasets in Detectron2 (needs Detectron2).

:func:`register_all` is idempotent; ``import mask2former`` calls it when Detectron2 is installed.

* META_ARCH "MaskFormer" and "SeMaskMaskFormer": this package's meta architectures (with the
  accelerations of :mod:`mask2former.accel`) with their backbone
  and head built through Detectron2's ``build_backbone`` / ``build_sem_seg_head`` (so Detectron2's
  ResNet, "build_resnet_backbone", is the R50/R101 backbone, as in the official extension),
  thing classes read from Detectron2's ``MetadataCatalog`` and Detectron2 structures out
  (:class:`_BuiltByDetectron2`).
* SEM_SEG_HEADS "MaskFormerHead" and "BranchMaskFormerHead" (SeMask): this package's heads,
  unchanged (they read the ``channels`` and ``stride`` of Detectron2's ``ShapeSpec`` like those of
  their own).
* BACKBONE "D2SwinTransformer" and "D2SeMaskSwinTransformer": this package's Swin and SeMask Swin,
  also Detectron2 ``Backbone`` s (:class:`_Detectron2Shapes`).
* kMaX-DeepLab, under the official extension's names and registries: META_ARCH "kMaXDeepLab",
  SEM_SEG_HEADS "kMaXDeepLabHead" (its pixel decoder, MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME, is looked
  up in Detectron2's SEM_SEG_HEADS, where "kMaXPixelDecoder" is registered, as officially),
  BACKBONE "custom_bn_build_resnet_backbone" (this package's ResNet with kMaX's batch norm, as a
  Detectron2 ``Backbone``) and "D2ConvNeXt". The transformer decoder, "kMaXTransformerDecoder",
  stays in this package's TRANSFORMER_MODULE registry (the official one is kMaX's own too).
* Datasets: every name of this package's ``DatasetCatalog`` that Detectron2's lacks, loading
  through this package's loaders, with its metadata copied to Detectron2's ``MetadataCatalog``.
  Names Detectron2 registers itself (``coco_2017_val_panoptic``, ``ade20k_sem_seg_val``,
  ``cityscapes_fine_*``, ...) are left to Detectron2, as the official extension does.
"""
import functools
import logging
import warnings
from typing import Dict, Optional, Set

from detectron2.data import DatasetCatalog as D2DatasetCatalog
from detectron2.data import MetadataCatalog as D2MetadataCatalog
from detectron2.layers import ShapeSpec as D2ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
from detectron2.modeling import Backbone as D2Backbone
from detectron2.modeling import build_backbone, build_sem_seg_head

from ..accel import accelerates, set_fast_inference
from ..accel.postprocess import SelectedPostprocessing
from ..config.configurable import configurable
from ..data.catalog import DatasetCatalog, MetadataCatalog, thing_contiguous_ids
from ..modeling.backbone.convnext import D2ConvNeXt as _ConvNeXt
from ..modeling.backbone.resnet import ResNet as _ResNet
from ..modeling.backbone.resnet import custom_bn_build_resnet_backbone as _custom_bn_resnet
from ..modeling.backbone.semask_swin import D2SeMaskSwinTransformer as _SeMaskSwin
from ..modeling.backbone.swin import D2SwinTransformer as _Swin
from ..modeling.heads import BranchMaskFormerHead, MaskFormerHead
from ..modeling.heads import kMaXDeepLabHead as _kMaXDeepLabHead
from ..modeling.meta_arch.kmax_deeplab import kMaXDeepLab as _kMaXDeepLab
from ..modeling.meta_arch.mask_former import MaskFormer as _MaskFormer
from ..modeling.meta_arch.semask_mask_former import SeMaskMaskFormer as _SeMaskMaskFormer
from ..modeling.pixel_decoder import kMaXPixelDecoder
from ..utils.registry import PIXEL_DECODER_REGISTRY, TRANSFORMER_DECODER_REGISTRY
from .convert import to_detectron2_outputs

__all__ = [
    "MaskFormer",
    "SeMaskMaskFormer",
    "MaskFormerHead",
    "BranchMaskFormerHead",
    "D2SwinTransformer",
    "D2SeMaskSwinTransformer",
    "kMaXDeepLab",
    "kMaXDeepLabHead",
    "kMaXPixelDecoder",
    "custom_bn_build_resnet_backbone",
    "D2ConvNeXt",
    "PIXEL_DECODER_REGISTRY",
    "TRANSFORMER_DECODER_REGISTRY",
    "register_all",
    "register_models",
    "register_datasets",
]

logger = logging.getLogger(__name__)

# dataset names this module registered in Detectron2's catalogs
_MIRRORED: Set[str] = set()


def _thing_ids_from_detectron2(cfg) -> Optional[Set[int]]:
    for name in list(cfg.DATASETS.TEST[:1]) + list(cfg.DATASETS.TRAIN[:1]):
        if name in D2MetadataCatalog.list():
            ids = thing_contiguous_ids(D2MetadataCatalog.get(name))
            if ids is not None:
                return ids
    return None


class _BuiltByDetectron2:
    """Mixin before one of this package's meta architectures: built from Detectron2's registries.
    Training returns the loss dict; inference returns one dict per image with ``instances`` as a
    Detectron2 ``Instances``. Built with the inference accelerations applied, as this package's
    ``build_model`` does (``fast_inference``)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        set_fast_inference(self)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        ret = super().from_config(cfg, backbone=backbone, sem_seg_head=sem_seg_head)
        thing_ids = _thing_ids_from_detectron2(cfg)
        if thing_ids is not None:
            ret["thing_ids"] = thing_ids
        return ret

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        return outputs if self.training else to_detectron2_outputs(outputs)


class MaskFormer(_BuiltByDetectron2, _MaskFormer):
    """Detectron2's META_ARCH "MaskFormer": this package's :class:`~mask2former.modeling.MaskFormer`."""


class SeMaskMaskFormer(_BuiltByDetectron2, _SeMaskMaskFormer):
    """Detectron2's META_ARCH "SeMaskMaskFormer": this package's
    :class:`~mask2former.modeling.meta_arch.semask_mask_former.SeMaskMaskFormer` (training adds
    ``loss_cate``; samples need ``sem_seg``)."""


class kMaXDeepLab(_BuiltByDetectron2, _kMaXDeepLab):
    """Detectron2's META_ARCH "kMaXDeepLab": this package's
    :class:`~mask2former.modeling.meta_arch.kmax_deeplab.kMaXDeepLab` (training samples: Detectron2
    ``Instances`` with ``gt_masks`` as ``BitMasks`` or a tensor, as the official mapper gives them)."""


class kMaXDeepLabHead(_kMaXDeepLabHead):
    """Detectron2's SEM_SEG_HEADS "kMaXDeepLabHead": this package's head, its pixel decoder taken
    from Detectron2's SEM_SEG_HEADS registry as the official head takes it."""

    pixel_decoder_registry = SEM_SEG_HEADS_REGISTRY


@accelerates(MaskFormer)
class _FastMaskFormer(SelectedPostprocessing, MaskFormer):
    pass


@accelerates(SeMaskMaskFormer)
class _FastSeMaskMaskFormer(SelectedPostprocessing, SeMaskMaskFormer):
    pass


class _Detectron2Shapes:
    """Mixin before one of this package's backbones: ``output_shape`` in Detectron2's ``ShapeSpec``."""

    def output_shape(self) -> Dict[str, D2ShapeSpec]:
        return {k: D2ShapeSpec(channels=v.channels, stride=v.stride) for k, v in super().output_shape().items()}


class D2SwinTransformer(_Detectron2Shapes, _Swin, D2Backbone):
    """Detectron2's BACKBONE "D2SwinTransformer": this package's Swin as a Detectron2 ``Backbone``."""


class D2SeMaskSwinTransformer(_Detectron2Shapes, _SeMaskSwin, D2Backbone):
    """Detectron2's BACKBONE "D2SeMaskSwinTransformer": this package's SeMask Swin (features from
    ``forward``, semantic priors from ``forward_with_priors``) as a Detectron2 ``Backbone``."""


class D2ConvNeXt(_Detectron2Shapes, _ConvNeXt, D2Backbone):
    """Detectron2's BACKBONE "D2ConvNeXt": this package's ConvNeXt (kMaX-DeepLab's) as a Detectron2
    ``Backbone``."""


class _D2ResNet(_Detectron2Shapes, _ResNet, D2Backbone):
    """This package's ResNet as a Detectron2 ``Backbone``."""


def custom_bn_build_resnet_backbone(cfg, input_shape):
    """Detectron2's BACKBONE "custom_bn_build_resnet_backbone": kMaX-DeepLab's ResNet (this
    package's builder) as a Detectron2 ``Backbone``."""
    return _custom_bn_resnet(cfg, input_shape, resnet_cls=_D2ResNet)


def _register(registry, obj) -> None:
    name = obj.__name__
    if name in registry:
        existing = registry.get(name)
        if existing is not obj:
            owner = getattr(existing, "__module__", "?")
            if not owner.startswith("mask2former"):
                warnings.warn(f"Detectron2's {registry._name} registry already has {name!r} (from {owner}); "
                              "mask2former leaves it in place", RuntimeWarning, stacklevel=3)
        return
    registry.register(obj)


def register_models() -> None:
    """The meta architectures, heads and backbones of this package in Detectron2's registries."""
    for registry, objs in ((META_ARCH_REGISTRY, (MaskFormer, SeMaskMaskFormer, kMaXDeepLab)),
                           (SEM_SEG_HEADS_REGISTRY, (MaskFormerHead, BranchMaskFormerHead, kMaXDeepLabHead,
                                                     kMaXPixelDecoder)),
                           (BACKBONE_REGISTRY, (D2SwinTransformer, D2SeMaskSwinTransformer, D2ConvNeXt,
                                                custom_bn_build_resnet_backbone))):
        for obj in objs:
            _register(registry, obj)


def _load(name: str):
    return DatasetCatalog.get(name)


def _copy_metadata(name: str) -> None:
    d2_meta = D2MetadataCatalog.get(name)
    for key, value in MetadataCatalog.get(name).as_dict().items():
        if key == "name":
            continue
        try:
            setattr(d2_meta, key, value)
        except AssertionError:  # Detectron2 already has a different value: keep its own
            logger.warning("metadata %r of dataset %r differs in Detectron2's MetadataCatalog; keeping "
                           "Detectron2's", key, name)


def register_datasets() -> list:
    """Register in Detectron2's catalogs the datasets of this package that Detectron2 lacks
    (again after more were registered: e.g. ``--datasets`` YAML files). Returns the new names."""
    new = []
    d2_names = set(D2DatasetCatalog.list())
    for name in DatasetCatalog.list():
        if name in _MIRRORED or name in d2_names:
            continue
        D2DatasetCatalog.register(name, functools.partial(_load, name))
        _copy_metadata(name)
        _MIRRORED.add(name)
        new.append(name)
    return new


def register_all() -> None:
    register_models()
    register_datasets()
