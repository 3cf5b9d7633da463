from .mask_former import MaskFormer, pad_images
from .semask_mask_former import SeMaskMaskFormer
from .kmax_deeplab import kMaXDeepLab
