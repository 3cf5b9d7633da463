from .fpn import BasePixelDecoder, TransformerEncoderPixelDecoder
from .msdeformattn import MSDeformAttnPixelDecoder
from .kmax_pixel_decoder import kMaXPixelDecoder
