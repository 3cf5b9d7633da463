"""Mask2Former: masked-attention mask transformer for panoptic, instance and semantic
segmentation, without a Detectron2 dependency.

    import mask2former as m2f
    cfg = m2f.get_cfg(); cfg.merge_from_file("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    model = m2f.build_model(cfg).eval(); m2f.load_checkpoint(model, "model_final.pkl")
    out = model([{"image": chw_tensor, "height": H, "width": W}])[0]
"""
from .checkpoint import load_checkpoint
from .config import add_deeplab_config, add_maskformer2_config, get_cfg
from .modeling import build_model

__version__ = "0.1.0"

__all__ = ["get_cfg", "build_model", "load_checkpoint", "add_maskformer2_config", "add_deeplab_config"]
