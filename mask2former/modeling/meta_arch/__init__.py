from .mask_former import MaskFormer
from .semask_mask_former import SeMaskMaskFormer
