from .conv import Conv2d, c2_msra_fill, c2_xavier_fill
from .conv_bn import ConvBN
from .norm import FrozenBatchNorm2d, LayerNorm2d, get_norm, tf_batch_norm
from .shape_spec import ShapeSpec
from .mlp import MLP
from .ms_deform_attn import MSDeformAttn
from .position_encoding import PositionEmbeddingSine
from .transformer_layers import (
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    attention_block,
    clones,
    ffn_block,
)
