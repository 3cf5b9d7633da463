"""Optional Detectron2 integration: with ``detectron2`` installed, this package plugs into it the
way the official Mask2Former extension does, with this project's implementation behind it.

``import mask2former`` calls :func:`maybe_register` (unless ``M2F_DETECTRON2=0``), which, when
Detectron2 can be imported:

* registers the model under its official names in Detectron2's registries: META_ARCH
  "MaskFormer", SEM_SEG_HEADS "MaskFormerHead", BACKBONE "D2SwinTransformer" (Detectron2's own
  "build_resnet_backbone" is used as is), and SeMask's META_ARCH "SeMaskMaskFormer", SEM_SEG_HEADS
  "BranchMaskFormerHead" and BACKBONE "D2SeMaskSwinTransformer", and kMaX-DeepLab's META_ARCH
  "kMaXDeepLab", SEM_SEG_HEADS "kMaXDeepLabHead" and "kMaXPixelDecoder", BACKBONE
  "custom_bn_build_resnet_backbone" and "D2ConvNeXt". Pixel decoders ("BasePixelDecoder",
  "MSDeformAttnPixelDecoder", ...) and transformer decoders ("MultiScaleMaskedTransformerDecoder",
  "StandardTransformerDecoder") live in this package's PIXEL_DECODER / TRANSFORMER_MODULE
  registries, as they live in the official extension's own registries (Detectron2 has none);
* registers this package's datasets that Detectron2 does not already know (the synthetic set,
  COCO panoptic with semantic PNGs, ADE20K panoptic/instance/full, Mapillary Vistas, ...) in
  Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Then ``detectron2.modeling.build_model(cfg)`` builds this package's MaskFormer from an official
config (``detectron2.config.get_cfg()`` + ``mask2former.add_deeplab_config`` +
``mask2former.add_maskformer2_config``, + ``mask2former.add_kmax_deeplab_config`` for kMaX-DeepLab),
``DetectionCheckpointer`` loads model-zoo checkpoints,
and the model returns Detectron2 ``Instances`` / ``Boxes`` that Detectron2's evaluators and
``Visualizer`` accept. :func:`build_mapper` gives this package's dataset mappers for Detectron2's
``build_detection_{train,test}_loader``, and :mod:`mask2former.detectron2.trainer` is a
Detectron2 ``DefaultTrainer`` (``train_net.py --engine detectron2``).

Without Detectron2 nothing here is imported and nothing changes. The submodules
(``registration``, ``convert``, ``trainer``) import Detectron2 and need it.
"""
import importlib.util
import os
import warnings

__all__ = ["INSTALL_HINT", "is_available", "require_detectron2", "maybe_register", "build_mapper",
           "register_all", "to_detectron2_outputs"]

INSTALL_HINT = (
    "Detectron2 is not installed. Install it with\n"
    "    pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html; it needs a C++ compiler)."
)


def is_available() -> bool:
    """Whether ``detectron2`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("detectron2") is not None
    except (ImportError, ValueError):
        return False


def require_detectron2() -> None:
    """Raise ImportError with install instructions when Detectron2 is missing."""
    if not is_available():
        raise ImportError(INSTALL_HINT)


def maybe_register() -> bool:
    """Register into Detectron2 when it is installed and ``M2F_DETECTRON2`` is not "0".

    Returns True when registered. Never raises: a failure is reported with one warning, and
    ``import mask2former`` (which calls this) keeps working without the integration.
    """
    if os.environ.get("M2F_DETECTRON2", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not is_available():
        return False
    try:
        from .registration import register_all

        register_all()
        return True
    except Exception as e:  # noqa: BLE001 - the integration is optional
        warnings.warn(
            f"mask2former: Detectron2 is installed but registering mask2former in it failed "
            f"({type(e).__name__}: {e}). mask2former itself works; Detectron2's build_model will not "
            f"know MaskFormer. Set M2F_DETECTRON2=0 to skip the integration.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def register_all() -> None:
    from .registration import register_all as _register_all

    _register_all()


def build_mapper(cfg, is_train: bool = True):
    """This package's INPUT.DATASET_MAPPER_NAME mapper, returning Detectron2 structures."""
    from .convert import build_mapper as _build_mapper

    return _build_mapper(cfg, is_train)


def to_detectron2_outputs(results):
    from .convert import to_detectron2_outputs as _convert

    return _convert(results)
