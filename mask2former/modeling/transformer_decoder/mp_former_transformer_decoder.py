"""MP-Former's decoder: Mask2Former's masked-attention decoder with mask-piloted training.

``MultiScaleMaskedTransformerDecoderMaskDN`` (the official name) differs from
:class:`MultiScaleMaskedTransformerDecoder` in two ways that show in its state dict:

* no learnable query positions (no ``query_embed.weight``): zero positions in attention;
* ``label_enc.weight`` (K, C): class embeddings, the content of the MP queries (training only).

In eval mode, or in training without targets or with ``MODEL.DN.NUM_DN`` 0, it computes exactly
Mask2Former's decoder with zero query positions. In training with targets it prepends the MP
queries (:mod:`.mask_piloting`) and returns, beside the matching queries' outputs, ``"dn_out"``:
``{"pred_logits" (N, P, K+1), "pred_masks" (N, P, H/4, W/4), "aux_outputs", "layout"}`` for the
P MP slots, which the criterion assigns directly to their objects.

A Mask2Former checkpoint loads into it: its ``query_embed.weight`` has no place here and is not
loaded (``load_checkpoint``/MODEL.WEIGHTS reports it as unexpected, ``load_state_dict`` drops it with
a log line), so the outputs change and fine-tuning adapts to that; ``label_enc`` keeps its
initialisation (``load_checkpoint`` reports it missing). The official code hard-codes 8 attention heads when it
builds the MP attention masks; here they follow NHEADS.

"shift" mode differs from the official code where that code cannot be what was meant: there, from
the second layer on, the bool MP masks are written into the sigmoid probabilities and thresholded
with ``< 0.5`` again, which inverts them (MP queries attend everywhere except their mask); here
they attend to their shifted mask in every layer. The official shift mode also fails on bool
ground-truth masks (nearest interpolation of bool) and with NOISE_SCALE 0 (no masks are built);
here NOISE_SCALE 0 gives the nearest-resized ground truth.
"""
import logging

import torch
from torch import nn

from ...config.configurable import configurable
from ...utils.registry import TRANSFORMER_DECODER_REGISTRY
from . import mask_piloting as mp
from .mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder

logger = logging.getLogger(__name__)


# the MP-Former keys and their defaults (config/defaults.py), as (section path, key)
_MP_KEYS = (("DN", "NUM_DN"), ("DN", "NOISE_SCALE"), ("MASK_FORMER", "DN_MODE"), ("MASK_FORMER", "HEAD_DN"),
            ("MASK_FORMER", "ALL_LY_DN"), ("MASK_FORMER", "DN_RATIO"), ("MASK_FORMER", "DN_NO_LB"),
            ("MASK_FORMER", "LB_NOISE_RATIO"))


def refuse_mp_settings(cfg, decoder_name: str) -> None:
    """A config that changes an MP-Former key while its decoder (``decoder_name``) has no MP
    queries asks for training that would not happen: a ValueError naming the key."""
    from ...config.defaults import MASKFORMER2_DEFAULTS

    defaults = MASKFORMER2_DEFAULTS["MODEL"]
    for section, key in _MP_KEYS:
        node = cfg.MODEL.get(section)
        if node is None or key not in node:
            continue
        if node[key] != defaults[section][key]:
            raise ValueError(
                f"MODEL.{section}.{key} is {node[key]!r} (default {defaults[section][key]!r}), a setting of MP-Former's "
                f"mask-piloted training, but MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME {decoder_name!r} has no "
                "mask-piloted queries; use MultiScaleMaskedTransformerDecoderMaskDN, or leave MODEL.DN.* and the "
                "MODEL.MASK_FORMER DN keys at their defaults")


def _check(value, ok: bool, key: str, expected: str):
    if not ok:
        raise ValueError(f"{key} must be {expected}; got {value!r}")
    return value


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoderMaskDN(MultiScaleMaskedTransformerDecoder):
    """Keys: those of MultiScaleMaskedTransformerDecoder without ``query_embed``, plus ``label_enc``."""

    mask_piloted = True

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, pre_norm: bool,
                 mask_dim: int, enforce_input_project: bool, num_dn: int = 5, noise_scale: float = 0.2,
                 dn_mode: str = "points", head_dn: bool = False, all_layers_dn: bool = False,
                 label_noise_ratio: float = -1.0):
        super().__init__(in_channels, mask_classification, num_classes=num_classes, hidden_dim=hidden_dim,
                         num_queries=num_queries, nheads=nheads, dim_feedforward=dim_feedforward,
                         dec_layers=dec_layers, pre_norm=pre_norm, mask_dim=mask_dim,
                         enforce_input_project=enforce_input_project)
        del self.query_embed
        self.label_enc = nn.Embedding(num_classes, hidden_dim)
        self.num_classes = num_classes
        self.num_dn = _check(num_dn, isinstance(num_dn, int) and num_dn >= 0, "MODEL.DN.NUM_DN", "an integer >= 0")
        self.noise_scale = _check(noise_scale, noise_scale >= 0, "MODEL.DN.NOISE_SCALE", ">= 0")
        self.dn_mode = _check(dn_mode, dn_mode in mp.OFFICIAL_MODES, "MODEL.MASK_FORMER.DN_MODE",
                              f"one of the official modes {list(mp.OFFICIAL_MODES)}")
        self.head_dn = bool(head_dn)
        self.all_layers_dn = bool(all_layers_dn)
        self.label_noise_ratio = _check(label_noise_ratio, label_noise_ratio <= 1,
                                        "MODEL.MASK_FORMER.LB_NOISE_RATIO", "<= 1 (<= 0: no label noise)")

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        return {**super().from_config(cfg, in_channels, mask_classification), "num_dn": cfg.MODEL.DN.NUM_DN,
                "noise_scale": cfg.MODEL.DN.NOISE_SCALE, "dn_mode": mf.DN_MODE, "head_dn": mf.HEAD_DN,
                "all_layers_dn": mf.ALL_LY_DN, "label_noise_ratio": mf.LB_NOISE_RATIO}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if state_dict.pop(prefix + "query_embed.weight", None) is not None:
            logger.info("%squery_embed.weight dropped: MP-Former's decoder has no learnable query positions",
                        prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def query_positions(self, bs):
        # zeros rather than none: attention then computes as Mask2Former's does with zero query
        # positions (queries and keys apart from values), so that with NUM_DN 0 a training step
        # is Mask2Former's bitwise; with none it would fuse the projections and round differently
        return self.query_feat.weight.new_zeros((self.num_queries, bs, self.query_feat.weight.shape[1]))

    def forward(self, x, mask_features, mask=None, targets=None):
        layout = None
        if self.training and targets is not None:
            layout = mp.mp_layout([len(t["labels"]) for t in targets], self.num_dn, mask_features.device)
        if layout is None:
            out = super().forward(x, mask_features, mask)
            if self.training:  # as the official decoder: label_enc gets a (zero) gradient in every
                # step, which DistributedDataParallel (find_unused_parameters False) requires
                out["pred_logits"] = out["pred_logits"] + self.label_enc.weight[0, 0] * 0.0
            return out
        if self.dn_mode not in mp.IMPLEMENTED_MODES:
            raise NotImplementedError(f"MODEL.MASK_FORMER.DN_MODE {self.dn_mode!r} is not implemented; "
                                      f"implemented: {list(mp.IMPLEMENTED_MODES)} ('points' is the released setting)")
        src, pos, sizes = self.memory(x)
        bs = src[0].shape[1]
        queries = torch.cat([self.mp_queries(targets, layout, bs), self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)])
        pilot = self.pilot(targets, layout, sizes, bs)
        self_mask = mp.self_attention_mask(layout, self.num_queries, mask_features.device)
        predictions = self.decode(queries, torch.zeros_like(queries), src, pos, sizes, mask_features, self_mask, pilot)
        p = layout.pad_size
        out = self.output_dict([(logits[:, p:], masks[:, p:], None) for logits, masks, _ in predictions])
        out["dn_out"] = {**self.output_dict([(logits[:, :p], masks[:, :p], None) for logits, masks, _ in predictions]),
                         "layout": layout}
        return out

    def mp_queries(self, targets, layout: mp.MPLayout, bs: int) -> torch.Tensor:
        """(P, N, C) content of the MP slots: class embeddings of the label-noised classes (shift
        mode without label noise: embeddings scaled by 1 + U(-s, s) noise instead); zeros in padding."""
        labels = torch.cat([t["labels"] for t in targets]).repeat(layout.num_groups)
        labels = mp.label_noise(labels, self.label_noise_ratio, self.num_classes)
        content = self.label_enc(labels)
        if self.dn_mode == "shift" and self.label_noise_ratio <= 0:
            content = content + (torch.rand_like(content) * 2 - 1.0) * self.noise_scale * content
        queries = content.new_zeros((bs, layout.pad_size, content.shape[-1]))
        queries[layout.batch_index, layout.slot_index] = content
        return queries.transpose(0, 1)

    def pilot(self, targets, layout: mp.MPLayout, sizes, bs: int):
        """The ``decode`` hook that puts the MP slots' attention masks (noised ground truth at the
        level of layer j) into the attention mask layer j reads: for every layer with ALL_LY_DN,
        else for the first four (j <= 3; the official code pilots the learnable-query prediction's
        mask and those of the first three layers' outputs)."""
        gt = [t["masks"] for t in targets]
        if self.dn_mode == "shift":
            static = mp.level_masks_for_shift(targets, sizes, layout.num_groups, self.noise_scale)

        def level_masks(j: int) -> torch.Tensor:
            level = j % self.num_feature_levels
            if self.dn_mode == "shift":
                return static[level]
            masks = mp.gt_attention_masks(gt, sizes[level]).repeat(layout.num_groups, 1)
            if self.head_dn:
                masks = masks[:, None].repeat(1, self.num_heads, 1)
            return mp.point_noise(masks, self.noise_scale)

        def rewrite(j: int, attn_mask):
            if attn_mask is None or not (j == 0 or self.all_layers_dn or j <= 3):
                return attn_mask
            attn = attn_mask.unflatten(0, (bs, self.num_heads)).clone()
            masks = level_masks(j)  # (M, hw) or (M, heads, hw)
            slots = torch.ones((bs, layout.pad_size) + tuple(masks.shape[1:]), dtype=torch.bool, device=attn.device)
            slots[layout.batch_index, layout.slot_index] = masks
            slots = slots.transpose(1, 2) if self.head_dn else slots[:, None].expand(-1, self.num_heads, -1, -1)
            slots = slots.clone()
            slots[slots.all(-1)] = False  # a slot with nothing to attend attends everywhere
            attn[:, :, : layout.pad_size] = slots
            return attn.flatten(0, 1)

        return rewrite
