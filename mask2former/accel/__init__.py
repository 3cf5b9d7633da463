"""Inference accelerations, applied to a built model; ``modeling/`` stays the plain computation.

    model = mask2former.build_model(cfg)   # applies them (model.fast_inference is True)
    model.fast_inference = False           # plain modules only: the reference the tests compare with

Each acceleration is a subclass of one plain module class that reaches bitwise the plain result
by a faster route in eval mode without autograd (see :mod:`.core` for how they attach, when they
run and how they verify themselves):

=====================================  ==============================  ========================
acceleration                           where                           replaces the plain
=====================================  ==============================  ========================
fused frozen BN + add + ReLU,          ``cpu/resnet.py``               ResNet stems, blocks,
channel-blocked activations,                                           ResNet
channels-last stem pooling
deformable-attention locations in the  ``cpu/pixel_decoder.py``        MSDeformAttn
kernel; FFN hidden and FPN upsampling                                  encoder layers, pixel
in kept scratch buffers, channels-last                                 decoder
upsampling
intermediate masks only at the pixels  ``decoder.py``                  transformer decoder
the attention masks read; one
broadcast mask for one image
masks upsampled only for the queries   ``postprocess.py``              MaskFormer
that panoptic / instance output uses
position encodings kept per size       ``position.py``                 PositionEmbeddingSine
=====================================  ==============================  ========================
"""
from . import decoder, position, postprocess  # noqa: F401  (registration)
from .core import (
    VerifiedOnce,
    accelerates,
    fast_inference_enabled,
    inference_active,
    module_state,
    plain_type,
    scratch_owner,
    set_fast_inference,
    verified,
)
from .cpu import pixel_decoder, resnet  # noqa: F401  (registration)

__all__ = [
    "set_fast_inference",
    "fast_inference_enabled",
    "accelerates",
    "inference_active",
    "plain_type",
    "module_state",
    "scratch_owner",
    "VerifiedOnce",
    "verified",
]
