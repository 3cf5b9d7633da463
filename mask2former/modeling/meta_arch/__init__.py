from .mask_former import MaskFormer
from .semask_mask_former import SeMaskMaskFormer
from .kmax_deeplab import kMaXDeepLab
