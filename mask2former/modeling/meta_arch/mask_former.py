"""MaskFormer meta architecture (used by both Mask2Former and MaskFormer v1 configs).

Input: a list of dicts, one per image, with "image": (C, H, W) tensor in INPUT.FORMAT channel
order (float or uint8, 0..255) and optionally "height"/"width", the output resolution.
Output in eval mode: one dict per image with any of
    "sem_seg": (K, height, width) class probabilities,
    "panoptic_seg": (int32 (height, width) segment ids, [{"id", "category_id", "isthing"}, ...]),
    "instances": Instances with pred_masks (N, height, width), scores, pred_classes, pred_boxes.
"""
import logging
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ...config.configurable import configurable
from ...data.catalog import MetadataCatalog, thing_contiguous_ids
from ...utils.registry import META_ARCH_REGISTRY
from .. import postprocessing as post
from ..backbone import build_backbone
from ..criterion import build_criterion
from ..transformer_decoder.mp_former_transformer_decoder import refuse_mp_settings
from ..heads import build_sem_seg_head

logger = logging.getLogger(__name__)


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 0,
               pad_value: float = 0.0) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Stack (C, h_i, w_i) images into (N, C, H, W), padding bottom/right to the largest size
    rounded up to a multiple of ``size_divisibility``. Returns the batch and the (h_i, w_i)."""
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    if len(images) == 1:
        h, w = sizes[0]
        batch = F.pad(images[0], (0, max_w - w, 0, max_h - h), value=pad_value).unsqueeze(0)
        return batch, sizes
    batch = images[0].new_full((len(images), images[0].shape[0], max_h, max_w), pad_value)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


def thing_ids_for(cfg) -> Optional[Set[int]]:
    """Contiguous ids of "thing" classes: from the metadata of DATASETS.TEST[0], else
    DATASETS.TRAIN[0]; None when neither dataset has a category table (then every class is
    treated as a thing: each query's segment stands alone, none are merged as stuff)."""
    for name in list(cfg.DATASETS.TEST[:1]) + list(cfg.DATASETS.TRAIN[:1]):
        ids = thing_contiguous_ids(MetadataCatalog.get(name))
        if ids is not None:
            return ids
    return None


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Backbone -> MaskFormerHead -> task post-processing. Keys: backbone.*, sem_seg_head.*,
    criterion.empty_weight."""

    @configurable
    def __init__(self, *, backbone: nn.Module, sem_seg_head: nn.Module, criterion: nn.Module, num_queries: int,
                 object_mask_threshold: float, overlap_threshold: float, thing_ids: Optional[Set[int]] = None,
                 size_divisibility: int, sem_seg_postprocess_before_inference: bool,
                 pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...], semantic_on: bool = True,
                 panoptic_on: bool = False, instance_on: bool = False, test_topk_per_image: int = 100):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        self.thing_ids = thing_ids
        if size_divisibility < 0:
            size_divisibility = backbone.size_divisibility
        self.size_divisibility = size_divisibility
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"MODEL.PIXEL_MEAN {pixel_mean} and MODEL.PIXEL_STD {pixel_std} differ in length")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        if not semantic_on and not sem_seg_postprocess_before_inference:
            raise ValueError("with SEMANTIC_ON off, masks must be resized before inference "
                             "(SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE)")
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.semantic_on, self.panoptic_on, self.instance_on = semantic_on, panoptic_on, instance_on
        self.test_topk_per_image = test_topk_per_image

    @property
    def fast_inference(self) -> bool:
        """Whether the inference accelerations of :mod:`mask2former.accel` are applied to this
        model (``build_model`` applies them). Setting it applies them or restores the plain
        modules of this package, which then run alone; both give bitwise the same results."""
        from ...accel import fast_inference_enabled  # accel builds on modeling, not the reverse

        return fast_inference_enabled(self)

    @fast_inference.setter
    def fast_inference(self, value: bool):
        from ...accel import set_fast_inference

        set_fast_inference(self, value)

    @classmethod
    def from_config(cls, cfg, backbone: Optional[nn.Module] = None, sem_seg_head: Optional[nn.Module] = None):
        # ``backbone`` / ``sem_seg_head``: modules built elsewhere (e.g. by Detectron2's registries,
        # see mask2former.detectron2); built from cfg with this package's registries when None
        backbone = backbone if backbone is not None else build_backbone(cfg)
        if sem_seg_head is None:
            sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        test = cfg.MODEL.MASK_FORMER.TEST
        mask_piloted = getattr(getattr(sem_seg_head, "predictor", None), "mask_piloted", False)
        if not mask_piloted:
            refuse_mp_settings(cfg, type(getattr(sem_seg_head, "predictor", sem_seg_head)).__name__)
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg, sem_seg_head.num_classes, mp_losses=mask_piloted),
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "thing_ids": thing_ids_for(cfg),
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            # panoptic and instance outputs are defined on masks at the output resolution
            "sem_seg_postprocess_before_inference": (
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or test.PANOPTIC_ON or test.INSTANCE_ON),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _check_image(self, i: int, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"batched_inputs[{i}]['image'] must be a torch.Tensor (C, H, W); got {type(image).__name__}")
        c = self.pixel_mean.shape[0]
        if image.dim() != 3 or image.shape[0] != c:
            raise ValueError(
                f"batched_inputs[{i}]['image'] must have shape ({c}, H, W) in INPUT.FORMAT channel order "
                f"(CHW, not HWC); got {tuple(image.shape)}")
        if not (image.is_floating_point() or image.dtype == torch.uint8):
            raise TypeError(
                f"batched_inputs[{i}]['image'] must be float or uint8 with values in 0..255; got {image.dtype}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"batched_inputs[{i}]['image'] is empty: shape {tuple(image.shape)}")
        return image

    def normalize(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """Validate the inputs; return normalised (C, h, w) float images on the model's device."""
        if not isinstance(batched_inputs, (list, tuple)) or not batched_inputs:
            raise TypeError("the model takes a non-empty list of dicts, one per image, each with an 'image' key")
        images = []
        for i, x in enumerate(batched_inputs):
            if not isinstance(x, dict) or "image" not in x:
                raise TypeError(f"batched_inputs[{i}] must be a dict with an 'image' tensor")
            image = self._check_image(i, x["image"]).to(self.device)
            images.append((image.float() - self.pixel_mean) / self.pixel_std)
        return images

    def preprocess(self, batched_inputs: List[Dict]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalise and pad into one (N, C, H, W) batch; returns it and the unpadded sizes."""
        return pad_images(self.normalize(batched_inputs), self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            # training: each sample also carries "instances" (gt_classes, gt_masks); the images
            # are padded into one batch and the losses come back already weighted
            targets_in = []
            for i, x in enumerate(batched_inputs):
                if not isinstance(x, dict) or "instances" not in x:
                    raise ValueError(
                        f"training mode: batched_inputs[{i}] has no 'instances'; the dataset mapper must provide "
                        "'instances': Instances(image_size=(H, W), gt_classes=int64 (N,), gt_masks=bool (N, H, W)) "
                        "for every sample (call model.eval() for inference)")
                targets_in.append(x["instances"])
            images, sizes = self.preprocess(batched_inputs)
            targets = self.prepare_targets(targets_in, tuple(images.shape[-2:]), sizes)
            losses = self.compute_losses(images, targets, batched_inputs)
            weights = self.criterion.weight_dict
            return {k: v * weights[k] for k, v in losses.items() if k in weights}
        return self.inference(batched_inputs)

    def compute_losses(self, images: torch.Tensor, targets: List[Dict], batched_inputs: List[Dict]) -> Dict:
        """Unweighted training losses of a normalised, padded (N, C, H, W) batch and its targets
        (see :meth:`prepare_targets`); ``batched_inputs``: the samples, for variants that read more."""
        return self.criterion(self.head_outputs(self.backbone(images), targets), targets)

    def head_outputs(self, features: Dict[str, torch.Tensor], targets: Optional[List[Dict]] = None) -> Dict:
        """The head's training outputs; a mask-piloted predictor (MP-Former) also gets the targets."""
        if getattr(getattr(self.sem_seg_head, "predictor", None), "mask_piloted", False):
            return self.sem_seg_head(features, targets=targets)
        return self.sem_seg_head(features)

    def prepare_targets(self, gt_instances: Sequence, padded_size: Tuple[int, int],
                        image_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Dict[str, torch.Tensor]]:
        """Instances (gt_classes (N,), gt_masks (N, h, w)) -> {"labels": int64 (N,), "masks": bool
        (N, H, W), "image_size": (h, w)} on the model's device, masks zero-padded bottom/right to
        the padded batch size.
        ``image_sizes``: the unpadded (h, w) of each image, which the masks must match."""
        pad_h, pad_w = padded_size
        targets = []
        for i, inst in enumerate(gt_instances):
            if not (inst.has("gt_classes") and inst.has("gt_masks")):
                raise ValueError(f"training mode: batched_inputs[{i}]['instances'] needs fields gt_classes and "
                                 f"gt_masks; has {sorted(inst.get_fields())}")
            masks = inst.gt_masks
            masks = getattr(masks, "tensor", masks)  # a BitMasks-like wrapper
            masks = torch.as_tensor(masks).to(self.device)
            labels = torch.as_tensor(inst.gt_classes).to(self.device, torch.int64)
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"training mode: batched_inputs[{i}]['instances'] has gt_masks {tuple(masks.shape)} "
                                 f"and gt_classes {tuple(labels.shape)}; expected (N, H, W) and (N,)")
            h, w = masks.shape[-2:]
            if (image_sizes is not None and (h, w) != tuple(image_sizes[i])) or h > pad_h or w > pad_w:
                size = tuple(image_sizes[i]) if image_sizes is not None else (pad_h, pad_w)
                raise ValueError(f"training mode: batched_inputs[{i}] gt_masks are {h}x{w} but the image is "
                                 f"{size[0]}x{size[1]}; the mapper must give masks at the image's size")
            padded = masks.new_zeros((masks.shape[0], pad_h, pad_w))
            padded[:, :h, :w] = masks
            targets.append({"labels": labels, "masks": padded, "image_size": (h, w)})
        return targets

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Padding changes the features (normalisation statistics, attention over padded pixels),
        so images are batched only with images of the same padded size. An image alone in its
        size gives bitwise its single-image result; in a batch, convolutions and matrix products
        sum in another order, so values may differ by float rounding (see README, Python API)."""
        images = self.normalize(batched_inputs)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self._padded_size(im), []).append(i)
        results: List[Optional[Dict]] = [None] * len(images)
        for idx in groups.values():
            batch, sizes = pad_images([images[i] for i in idx], self.size_divisibility)
            outputs = self.predict_padded(batch)
            group_results = self.postprocess(outputs, [batched_inputs[i] for i in idx], sizes, tuple(batch.shape[-2:]))
            for i, r in zip(idx, group_results):
                results[i] = r
        return results

    def predict_padded(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Head outputs ("pred_logits" (N, Q, K+1), "pred_masks" (N, Q, H/4, W/4)) of a normalised,
        padded (N, C, H, W) batch, as inference computes them (also used by test-time augmentation)."""
        return self.sem_seg_head(self.backbone(batch))

    def _padded_size(self, image: torch.Tensor) -> Tuple[int, int]:
        d = max(self.size_divisibility, 1)
        return (-(-image.shape[-2] // d) * d, -(-image.shape[-1] // d) * d)

    def postprocess(self, outputs, batched_inputs, image_sizes, padded_size):
        """Head outputs of a padded batch -> one result dict per image (see the module docstring)."""
        mask_pred_results = F.interpolate(outputs["pred_masks"], size=padded_size, mode="bilinear",
                                          align_corners=False)
        results = []
        for mask_cls, mask_pred, inp, image_size in zip(outputs["pred_logits"], mask_pred_results, batched_inputs,
                                                        image_sizes):
            height = int(inp.get("height", image_size[0]))
            width = int(inp.get("width", image_size[1]))
            mask_cls, mask_pred, res = self.resize_and_semantic(mask_cls, mask_pred, image_size, height, width)
            res.update(self.segments_inference(mask_cls, mask_pred))
            results.append(res)
        return results

    def resize_and_semantic(self, mask_cls, mask_pred, image_size, height: int, width: int):
        """One image's mask_cls (Q, K+1) and padded mask_pred (Q, H, W) logits -> (mask_cls,
        mask_pred at (oh, ow) when SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE, {"sem_seg": (K, oh,
        ow)} when SEMANTIC_ON else {})."""
        res = {}
        if self.sem_seg_postprocess_before_inference:
            mask_pred = post.sem_seg_postprocess(mask_pred, image_size, height, width)
            mask_cls = mask_cls.to(mask_pred)
        if self.semantic_on:
            r = post.semantic_inference(mask_cls, mask_pred)
            if not self.sem_seg_postprocess_before_inference:
                r = post.sem_seg_postprocess(r, image_size, height, width)
            res["sem_seg"] = r
        return mask_cls, mask_pred, res

    def segments_inference(self, mask_cls, mask_pred) -> Dict:
        """"panoptic_seg" and/or "instances" (as PANOPTIC_ON / INSTANCE_ON) of one image's
        mask_cls (Q, K+1) and mask_pred (Q, oh, ow) logits."""
        res = {}
        if self.panoptic_on:
            res["panoptic_seg"] = post.panoptic_inference(
                mask_cls, mask_pred, num_classes=self.sem_seg_head.num_classes, thing_ids=self.thing_ids,
                object_mask_threshold=self.object_mask_threshold, overlap_threshold=self.overlap_threshold)
        if self.instance_on:
            res["instances"] = post.instance_inference(
                mask_cls, mask_pred, num_classes=self.sem_seg_head.num_classes, topk=self.test_topk_per_image,
                thing_ids=self.thing_ids if self.panoptic_on else None)
        return res
