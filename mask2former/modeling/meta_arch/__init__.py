from .mask_former import MaskFormer, pad_images
