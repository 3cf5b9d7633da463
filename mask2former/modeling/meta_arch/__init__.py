from .mask_former import MaskFormer, pad_images  # pad_images: public here before 29009e4 dropped it
from .semask_mask_former import SeMaskMaskFormer
from .kmax_deeplab import kMaXDeepLab
