"""kMaX-DeepLab's meta architecture (``kMaXDeepLab``): backbone -> kMaXDeepLabHead -> kMaX
post-processing, at one fixed input size. Keys: backbone.*, sem_seg_head.*.

Input convention (the official test path): the image's long side already resized to
INPUT.IMAGE_SIZE (the test-time mapper's ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST) does
it), "height"/"width" the size to predict at (the source image's). The model normalises, zero-pads
right and bottom to IMAGE_SIZE (the axial attention only runs at that size), upsamples the
stride-4 mask logits to it, crops rows/columns [:round(oh * s), :round(ow * s)] with
s = max(IMAGE_SIZE) / max(oh, ow) and resizes to (oh, ow); both resizes align corners when the
padded width is odd.

Where the official code breaks, this one does not: an image larger than IMAGE_SIZE (which the
official code cannot run) is first resized to fit inside it (bilinear, keeping its aspect ratio),
and an image whose crop would not be its own area (long side shorter than IMAGE_SIZE, or
"height"/"width" of another aspect ratio, which the official code crops at the wrong scale) is
cropped to its own area. Inputs that follow the convention get the official numbers. Without
"height"/"width" the output has the input image's size (the official code returns the padded one).

Training (``model.train()``): each sample also carries "instances" (gt_classes (N,), gt_masks
(N, h, w) at the image's size, h, w within IMAGE_SIZE: the kMaX mappers crop to it) and optionally
"is_real_pixels" (h, w); the normalised image is zeroed where that is False and zero-padded to
IMAGE_SIZE, the masks are padded likewise and read at every 4th pixel ([::4, ::4], the stride-4
output's grid); the kMaX losses (kmax_criterion.py) come back weighted by their
MODEL.KMAX_DEEPLAB.*_WEIGHT, computed in float32.

Output per image: "panoptic_seg" (int32 (oh, ow), segments_info) and "original_image" (the model
input cropped and resized to (oh, ow), uint8 (3, oh, ow), as the official code returns) when
PANOPTIC_ON; "sem_seg" (K, oh, ow) class probabilities when SEMANTIC_ON; "instances" when INSTANCE_ON.
MODEL.KMAX_DEEPLAB.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE is not read: masks are always
resized first (the official semantic-only path then crops its output a second time, to the padded
size, which matters only for outputs larger than IMAGE_SIZE; not reproduced).
"""
import logging
from typing import Dict, List, Sequence, Tuple

import torch
from torch.nn import functional as F

from ...config.config import image_size_hw
from ...config.configurable import configurable
from ...utils.registry import META_ARCH_REGISTRY
from .. import kmax_postprocessing as post
from ..kmax_criterion import build_kmax_criterion
from ..backbone import build_backbone
from ..heads import build_sem_seg_head
from .mask_former import MaskFormer, thing_ids_for

__all__ = ["kMaXDeepLab", "output_crop"]

logger = logging.getLogger(__name__)


def output_crop(image_hw: Tuple[int, int], padded_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> Tuple[int, int]:
    """Rows and columns of the padded canvas that show the image: the official crop
    (round(oh * s), round(ow * s)), s = max(padded) / max(out), when it is the image's own area
    to a pixel (the input convention), else the image's size."""
    s = max(padded_hw) / max(out_hw)
    crop = (round(out_hw[0] * s), round(out_hw[1] * s))
    if abs(crop[0] - image_hw[0]) <= 1 and abs(crop[1] - image_hw[1]) <= 1:
        return crop
    return image_hw


@META_ARCH_REGISTRY.register()
class kMaXDeepLab(MaskFormer):
    """MaskFormer's input checks, training loop and fast-inference switch; kMaX's input size,
    losses and post-processing."""

    @configurable
    def __init__(self, *, input_size: Sequence[int], pixel_confidence_threshold: float, class_threshold_thing: float,
                 class_threshold_stuff: float, reorder_class_weight: float, reorder_mask_weight: float,
                 channel_last_format: bool = False, **kwargs):
        # MaskFormer's object_mask_threshold has no kMaX counterpart; masks are resized before inference
        super().__init__(object_mask_threshold=0.0, sem_seg_postprocess_before_inference=True, **kwargs)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channel_last_format = channel_last_format
        self.pixel_confidence_threshold = pixel_confidence_threshold
        # the keywords of kmax_panoptic_inference
        self.panoptic_options = dict(
            pixel_confidence_threshold=pixel_confidence_threshold, class_threshold_thing=class_threshold_thing,
            class_threshold_stuff=class_threshold_stuff, overlap_threshold=self.overlap_threshold,
            reorder_class_weight=reorder_class_weight, reorder_mask_weight=reorder_mask_weight)

    @classmethod
    def from_config(cls, cfg, backbone=None, sem_seg_head=None):
        backbone = backbone if backbone is not None else build_backbone(cfg)
        if sem_seg_head is None:
            sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        k = cfg.MODEL.KMAX_DEEPLAB
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_kmax_criterion(cfg, sem_seg_head.num_classes),
            "num_queries": k.TRANS_DEC.NUM_OBJECT_QUERIES,
            "overlap_threshold": k.TEST.OVERLAP_THRESHOLD,
            "thing_ids": thing_ids_for(cfg),
            "size_divisibility": k.SIZE_DIVISIBILITY,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "semantic_on": k.TEST.SEMANTIC_ON,
            "instance_on": k.TEST.INSTANCE_ON,
            "panoptic_on": k.TEST.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_size": image_size_hw(cfg.INPUT.IMAGE_SIZE),
            "pixel_confidence_threshold": k.TEST.PIXEL_CONFIDENCE_THRESHOLD,
            "class_threshold_thing": k.TEST.CLASS_THRESHOLD_THING,
            "class_threshold_stuff": k.TEST.CLASS_THRESHOLD_STUFF,
            "reorder_class_weight": k.TEST.REORDER_CLASS_WEIGHT,
            "reorder_mask_weight": k.TEST.REORDER_MASK_WEIGHT,
            "channel_last_format": k.CHANNEL_LAST_FORMAT,
        }

    # the stride of the mask logits; targets are read on their grid
    MASK_STRIDE = 4

    def preprocess(self, batched_inputs: List[Dict]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Training batch: normalised images, zeroed where "is_real_pixels" is False, zero-padded
        to INPUT.IMAGE_SIZE; returns it and the unpadded sizes."""
        images = self.normalize(batched_inputs)
        pad_h, pad_w = self.input_size
        for i, (x, im) in enumerate(zip(batched_inputs, images)):
            h, w = im.shape[-2:]
            if h > pad_h or w > pad_w:
                raise ValueError(f"training mode: batched_inputs[{i}]['image'] is {h}x{w}, larger than "
                                 f"INPUT.IMAGE_SIZE {[pad_h, pad_w]}; the training mapper must crop to it (e.g. "
                                 "INPUT.DATASET_MAPPER_NAME coco_panoptic_kmaxdeeplab)")
            if x.get("is_real_pixels") is not None:
                images[i] = im * torch.as_tensor(x["is_real_pixels"]).to(im)
        batch = torch.stack([F.pad(im, (0, pad_w - im.shape[-1], 0, pad_h - im.shape[-2])) for im in images])
        return batch, [tuple(im.shape[-2:]) for im in images]

    def compute_losses(self, images: torch.Tensor, targets: List[Dict], batched_inputs: List[Dict]) -> Dict:
        outputs = self.predict_padded(images)
        size = tuple(outputs["pred_masks"].shape[-2:])
        s = self.MASK_STRIDE
        targets = [{"labels": t["labels"], "masks": t["masks"][:, ::s, ::s]} for t in targets]
        if targets and tuple(targets[0]["masks"].shape[-2:]) != size:
            raise ValueError(f"the masks of INPUT.IMAGE_SIZE {list(self.input_size)} read at every {s}th pixel are "
                             f"{tuple(targets[0]['masks'].shape[-2:])}, the predicted masks {size}")
        with torch.autocast(images.device.type, enabled=False):
            return self.criterion(outputs, targets)

    def fit_inputs(self, batched_inputs: List[Dict]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Validated inputs -> (normalised images, float images 0..255), each (C, h, w) with h, w
        within INPUT.IMAGE_SIZE (larger images resized to fit)."""
        images = self.normalize(batched_inputs)  # also validates the inputs
        raws = []
        for i, x in enumerate(batched_inputs):
            raw = x["image"].to(self.device).float()
            real = x.get("is_real_pixels")  # the official mapper's padding mask: padded pixels become 0
            h, w = raw.shape[-2:]
            if h > self.input_size[0] or w > self.input_size[1]:
                s = min(self.input_size[0] / h, self.input_size[1] / w)
                size = (max(1, min(self.input_size[0], round(h * s))), max(1, min(self.input_size[1], round(w * s))))
                logger.debug("input %d of %dx%d is larger than INPUT.IMAGE_SIZE %s: resized to %s", i, h, w,
                             self.input_size, size)
                raw = F.interpolate(raw[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
                images[i] = (raw - self.pixel_mean) / self.pixel_std
                if real is not None:
                    real = F.interpolate(torch.as_tensor(real).to(raw)[None, None], size=size, mode="nearest")[0, 0]
            if real is not None:
                images[i] = images[i] * torch.as_tensor(real).to(images[i])
            raws.append(raw)
        return images, raws

    def predict_padded(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Head outputs ("pred_logits" (N, Q, K+1), "pred_masks" (N, Q, H/4, W/4)) of a normalised
        (N, C, H, W) batch padded to INPUT.IMAGE_SIZE."""
        if self.channel_last_format:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.sem_seg_head(self.backbone(batch))

    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        images, raws = self.fit_inputs(batched_inputs)
        pad_h, pad_w = self.input_size
        batch = torch.stack([F.pad(im, (0, pad_w - im.shape[-1], 0, pad_h - im.shape[-2])) for im in images])
        outputs = self.predict_padded(batch)
        align = pad_w % 2 == 1
        masks = F.interpolate(outputs["pred_masks"], size=(pad_h, pad_w), mode="bilinear", align_corners=align)
        results = []
        for i, x in enumerate(batched_inputs):
            image_hw = tuple(images[i].shape[-2:])
            out_hw = (int(x.get("height", x["image"].shape[-2])), int(x.get("width", x["image"].shape[-1])))
            ch, cw = output_crop(image_hw, (pad_h, pad_w), out_hw)
            mask_pred = F.interpolate(masks[i: i + 1, :, :ch, :cw], size=out_hw, mode="bilinear",
                                      align_corners=align)[0]
            results.append(self.segments(outputs["pred_logits"][i].to(mask_pred), mask_pred))
            if self.panoptic_on:
                shown = F.interpolate(raws[i][None, :, :ch, :cw], size=out_hw, mode="bilinear", align_corners=align)
                results[-1]["original_image"] = shown[0].to(torch.uint8)  # truncation, as the official cast
        return results

    def segments(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> Dict:
        """One image's class logits (Q, K+1) and mask logits (Q, oh, ow) -> its results."""
        res = {}
        if not (self.semantic_on or self.panoptic_on or self.instance_on):
            return res
        mask_probs = F.softmax(mask_pred, dim=0)
        if self.semantic_on:
            res["sem_seg"] = post.kmax_semantic_inference(mask_cls, mask_probs)
        if self.panoptic_on:
            res["panoptic_seg"] = post.kmax_panoptic_inference(mask_cls, mask_probs, thing_ids=self.thing_ids,
                                                               **self.panoptic_options)
        if self.instance_on:
            res["instances"] = post.kmax_instance_inference(
                mask_cls, mask_probs, num_classes=self.sem_seg_head.num_classes, topk=self.test_topk_per_image,
                pixel_confidence_threshold=self.pixel_confidence_threshold,
                thing_ids=self.thing_ids if self.panoptic_on else None)
        return res

    # read by MaskFormerWithTTA, which refuses the model (the official code has no TTA either)
    NO_TTA_REASON = "kMaX-DeepLab has no test-time augmentation: it runs at one fixed input size, INPUT.IMAGE_SIZE"

    def resize_and_semantic(self, *args, **kwargs):
        raise NotImplementedError(f"{self.NO_TTA_REASON} (TEST.AUG.ENABLED)")

    segments_inference = resize_and_semantic
