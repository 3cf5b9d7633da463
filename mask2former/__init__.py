"""Mask2Former: masked-attention mask transformer for panoptic, instance and semantic
segmentation, without a Detectron2 dependency.

    import mask2former as m2f
    cfg = m2f.get_cfg(); cfg.merge_from_file("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    model = m2f.build_model(cfg).eval(); m2f.load_checkpoint(model, "model_final.pkl")
    out = model([{"image": chw_tensor, "height": H, "width": W}])[0]
"""
from .checkpoint import load_checkpoint
from .config import UnsafeConfigError, add_deeplab_config, add_kmax_deeplab_config, add_maskformer2_config, get_cfg
from .data.dataset_mappers import (  # the official package exports its mappers here too
    COCOInstanceNewBaselineDatasetMapper,
    PanoptickMaXDeepLabDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
)
from .evaluation import InstanceSegEvaluator
from .modeling import MaskFormer, build_model, kMaXDeepLab

__version__ = "0.1.0"

__all__ = [
    "get_cfg",
    "build_model",
    "load_checkpoint",
    "add_maskformer2_config",
    "add_deeplab_config",
    "add_kmax_deeplab_config",
    "UnsafeConfigError",
    "MaskFormer",
    "kMaXDeepLab",
    "InstanceSegEvaluator",
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "COCOInstanceNewBaselineDatasetMapper",
    "PanoptickMaXDeepLabDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
]

# With Detectron2 installed, register MaskFormer and the datasets in its registries (as the official
# extension does); without it this is one cheap check. M2F_DETECTRON2=0 turns it off.
from .detectron2 import maybe_register as _maybe_register_detectron2  # noqa: E402

_maybe_register_detectron2()
