"""Transformer-decoder inference: intermediate masks only where the attention masks read them.

In inference the masks of the decoder's intermediate predictions serve one purpose: the next
layer's attention mask, their bilinear downsampling to a coarser level. Where the factor is an
even integer >= 4 (levels at 1/32 and 1/16 of the image from masks at 1/4), each output pixel of
that downsampling reads only a 2x2 block of its input, with weights 1/2: computing the masks at
those pixels only (:func:`attention_mask_pixels`) gives the same attention mask from a fraction
of the product. That relies on the matrix product giving each pixel the same bits whatever the
other columns are, which BLAS libraries do not promise, so it is verified once per shape
(``VerifiedOnce``). The auxiliary outputs are then left out (``aux_outputs`` is empty), since
their masks are not computed; the final prediction is complete.

With one image the attention mask is one (Q, h*w) mask that attention broadcasts over the heads,
the same values as the per-head copies the plain decoder builds.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from ..modeling.transformer_decoder.mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder
from ..modeling.transformer_decoder.mp_former_transformer_decoder import MultiScaleMaskedTransformerDecoderMaskDN
from .core import accelerates, inference_active, module_state, verified

__all__ = ["attention_mask_pixels", "FastMultiScaleMaskedTransformerDecoder", "FastMultiScaleMaskedTransformerDecoderMaskDN"]


def _read_factor(n_in: int, n_out: int) -> Optional[int]:
    """The factor of bilinear resizing n_in -> n_out (align_corners=False) when each output index
    reads its own two inputs with weights 1/2 (factor*i + factor/2 - 1 and the next), i.e. n_in
    is an even multiple (>= 4) of n_out; else None."""
    if n_out <= 0 or n_in % n_out or (n_in // n_out) % 2 or n_in // n_out < 4:
        return None
    return n_in // n_out


def attention_mask_pixels(mask_features: torch.Tensor, size) -> Optional[torch.Tensor]:
    """The pixels of mask_features (N, C, H, W) that bilinearly downsampling a map of that size to
    ``size`` (h, w) reads: (N, C, 2h, 2w), in which each output pixel reads its own 2x2 block with
    the same weights (1/2), so downsampling it to (h, w) gives the same values. None when the
    factors are not even integers >= 4 (then it saves nothing or does not apply)."""
    (n, c, hh, ww), (h, w) = mask_features.shape, size
    fy, fx = _read_factor(hh, h), _read_factor(ww, w)
    if fy is None or fx is None:
        return None
    blocks = mask_features.unflatten(3, (w, fx)).unflatten(2, (h, fy))  # (N, C, h, fy, w, fx)
    return blocks[:, :, :, fy // 2 - 1: fy // 2 + 1, :, fx // 2 - 1: fx // 2 + 1].reshape(n, c, 2 * h, 2 * w)


class _FastMaskedDecoder:
    """The acceleration of the masked-attention decoders (Mask2Former's and MP-Former's, whose
    inference is Mask2Former's): mixed in before the plain class."""

    def forward(self, x, mask_features, mask=None, **kwargs):
        if not inference_active(self):
            return super().forward(x, mask_features, mask, **kwargs)
        # the layers cycle over three levels: select each level's pixels once per call (per thread)
        calls = module_state(self).setdefault("pixels", {})
        calls[threading.get_ident()] = {}
        try:
            return super().forward(x, mask_features, mask, **kwargs)
        finally:
            calls.pop(threading.get_ident(), None)

    def _pixels(self, mask_features, size):
        selected = module_state(self).get("pixels", {}).get(threading.get_ident())
        if selected is None:
            return attention_mask_pixels(mask_features, size)
        if size not in selected:
            selected[size] = attention_mask_pixels(mask_features, size)
        return selected[size]

    def prediction_heads(self, output, mask_features, attn_mask_size):
        pixels = None
        if attn_mask_size is not None and inference_active(self):
            pixels = self._pixels(mask_features, tuple(attn_mask_size))
        if pixels is None:
            return super().prediction_heads(output, mask_features, attn_mask_size)
        logits, embed = self.class_and_mask_embed(output)

        def selected():
            return logits, None, self.attention_mask(torch.einsum("bqc,bchw->bqhw", embed, pixels), attn_mask_size)

        def plain():
            return super(_FastMaskedDecoder, self).prediction_heads(
                output, mask_features, attn_mask_size)

        key = ("selected pixels", mask_features.device.type, mask_features.dtype, tuple(embed.shape),
               tuple(mask_features.shape), tuple(attn_mask_size))
        return verified(self).run(key, selected, plain, lambda a, b: torch.equal(a[2], b[2]))

    def output_dict(self, predictions):
        out = super().output_dict(predictions)
        if any(masks is None for _, masks, _ in predictions):
            out["aux_outputs"] = []  # their masks were computed at the attention masks' pixels only
        return out

    def attention_mask(self, masks, size):
        if masks.shape[0] == 1 and inference_active(self):
            # one image: a (Q, h*w) mask that attention broadcasts over the heads, the same values
            # as the heads' copies
            return self.query_attention_mask(masks, size)[0]
        return super().attention_mask(masks, size)


@accelerates(MultiScaleMaskedTransformerDecoder)
class FastMultiScaleMaskedTransformerDecoder(_FastMaskedDecoder, MultiScaleMaskedTransformerDecoder):
    pass


@accelerates(MultiScaleMaskedTransformerDecoderMaskDN)
class FastMultiScaleMaskedTransformerDecoderMaskDN(_FastMaskedDecoder, MultiScaleMaskedTransformerDecoderMaskDN):
    pass
