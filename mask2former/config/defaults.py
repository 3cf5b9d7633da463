"""Default config values, as plain nested dicts (one source of truth per key).

``DETECTRON2_DEFAULTS`` is Detectron2's ``get_cfg()`` schema (VERSION 2), so configs dumped by
Detectron2 merge without unknown keys. ``DEEPLAB_DEFAULTS`` and ``MASKFORMER2_DEFAULTS`` are the
keys that the official ``add_deeplab_config`` / ``add_maskformer2_config`` add.

Many Detectron2 sections (RPN, ROI heads, RetinaNet, ...) are unused by Mask2Former; they exist
only so that full config dumps load. Tuples are kept where Detectron2 uses tuples, because yacs
preserves the default's container type when merging.
"""

# Shared by both add-on functions (each official function sets it); defined once here.
_SINGLE_CATEGORY_MAX_AREA = 1.0

DETECTRON2_DEFAULTS = {
    "VERSION": 2,
    "MODEL": {
        "LOAD_PROPOSALS": False,
        "MASK_ON": False,
        "KEYPOINT_ON": False,
        "DEVICE": "cuda",
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "WEIGHTS": "",
        # BGR, 0-255, Caffe2-style; Mask2Former configs override with torchvision RGB stats.
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "ANCHOR_GENERATOR": {
            "NAME": "DefaultAnchorGenerator",
            "SIZES": [[32, 64, 128, 256, 512]],
            "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
            "ANGLES": [[-90, 0, 90]],
            "OFFSET": 0.0,
        },
        "RPN": {
            "HEAD_NAME": "StandardRPNHead",
            "IN_FEATURES": ["res4"],
            "BOUNDARY_THRESH": -1,
            "IOU_THRESHOLDS": [0.3, 0.7],
            "IOU_LABELS": [0, -1, 1],
            "BATCH_SIZE_PER_IMAGE": 256,
            "POSITIVE_FRACTION": 0.5,
            "BBOX_REG_LOSS_TYPE": "smooth_l1",
            "BBOX_REG_LOSS_WEIGHT": 1.0,
            "BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
            "SMOOTH_L1_BETA": 0.0,
            "LOSS_WEIGHT": 1.0,
            "PRE_NMS_TOPK_TRAIN": 12000,
            "PRE_NMS_TOPK_TEST": 6000,
            "POST_NMS_TOPK_TRAIN": 2000,
            "POST_NMS_TOPK_TEST": 1000,
            "NMS_THRESH": 0.7,
            "CONV_DIMS": [-1],
        },
        "ROI_HEADS": {
            "NAME": "Res5ROIHeads",
            "NUM_CLASSES": 80,
            "IN_FEATURES": ["res4"],
            "IOU_THRESHOLDS": [0.5],
            "IOU_LABELS": [0, 1],
            "BATCH_SIZE_PER_IMAGE": 512,
            "POSITIVE_FRACTION": 0.25,
            "SCORE_THRESH_TEST": 0.05,
            "NMS_THRESH_TEST": 0.5,
            "PROPOSAL_APPEND_GT": True,
        },
        "ROI_BOX_HEAD": {
            "NAME": "",
            "BBOX_REG_LOSS_TYPE": "smooth_l1",
            "BBOX_REG_LOSS_WEIGHT": 1.0,
            "BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0),
            "SMOOTH_L1_BETA": 0.0,
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "POOLER_TYPE": "ROIAlignV2",
            "NUM_FC": 0,
            "FC_DIM": 1024,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_BBOX_REG": False,
            "TRAIN_ON_PRED_BOXES": False,
            "USE_FED_LOSS": False,
            "USE_SIGMOID_CE": False,
            "FED_LOSS_FREQ_WEIGHT_POWER": 0.5,
            "FED_LOSS_NUM_CLASSES": 50,
        },
        "ROI_BOX_CASCADE_HEAD": {
            "BBOX_REG_WEIGHTS": (
                (10.0, 10.0, 5.0, 5.0),
                (20.0, 20.0, 10.0, 10.0),
                (30.0, 30.0, 15.0, 15.0),
            ),
            "IOUS": (0.5, 0.6, 0.7),
        },
        "ROI_MASK_HEAD": {
            "NAME": "MaskRCNNConvUpsampleHead",
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_MASK": False,
            "POOLER_TYPE": "ROIAlignV2",
        },
        "ROI_KEYPOINT_HEAD": {
            "NAME": "KRCNNConvDeconvUpsampleHead",
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "CONV_DIMS": (512,) * 8,
            "NUM_KEYPOINTS": 17,
            "MIN_KEYPOINTS_PER_IMAGE": 1,
            "NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS": True,
            "LOSS_WEIGHT": 1.0,
            "POOLER_TYPE": "ROIAlignV2",
        },
        "SEM_SEG_HEAD": {
            "NAME": "SemSegFPNHead",
            "IN_FEATURES": ["p2", "p3", "p4", "p5"],
            "IGNORE_VALUE": 255,
            "NUM_CLASSES": 54,
            "CONVS_DIM": 128,
            "COMMON_STRIDE": 4,
            "NORM": "GN",
            "LOSS_WEIGHT": 1.0,
        },
        "PANOPTIC_FPN": {
            "INSTANCE_LOSS_WEIGHT": 1.0,
            "COMBINE": {
                "ENABLED": True,
                "OVERLAP_THRESH": 0.5,
                "STUFF_AREA_LIMIT": 4096,
                "INSTANCES_CONFIDENCE_THRESH": 0.5,
            },
        },
        "RETINANET": {
            "NUM_CLASSES": 80,
            "IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"],
            "NUM_CONVS": 4,
            "IOU_THRESHOLDS": [0.4, 0.5],
            "IOU_LABELS": [0, -1, 1],
            "PRIOR_PROB": 0.01,
            "SCORE_THRESH_TEST": 0.05,
            "TOPK_CANDIDATES_TEST": 1000,
            "NMS_THRESH_TEST": 0.5,
            "BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
            "FOCAL_LOSS_GAMMA": 2.0,
            "FOCAL_LOSS_ALPHA": 0.25,
            "SMOOTH_L1_LOSS_BETA": 0.1,
            "BBOX_REG_LOSS_TYPE": "smooth_l1",
            "NORM": "",
        },
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            # True = MSRA/Caffe2 ResNet (stride in the 1x1 conv); torchvision weights need False.
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
            "DEFORM_MODULATED": False,
            "DEFORM_NUM_GROUPS": 1,
        },
    },
    "INPUT": {
        "MIN_SIZE_TRAIN": (800,),
        "MIN_SIZE_TRAIN_SAMPLING": "choice",
        "MAX_SIZE_TRAIN": 1333,
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
        "RANDOM_FLIP": "horizontal",
        "CROP": {"ENABLED": False, "TYPE": "relative_range", "SIZE": [0.9, 0.9]},
        "FORMAT": "BGR",
        "MASK_FORMAT": "polygon",
    },
    "DATASETS": {
        "TRAIN": (),
        "PROPOSAL_FILES_TRAIN": (),
        "PRECOMPUTED_PROPOSAL_TOPK_TRAIN": 2000,
        "TEST": (),
        "PROPOSAL_FILES_TEST": (),
        "PRECOMPUTED_PROPOSAL_TOPK_TEST": 1000,
    },
    "DATALOADER": {
        "NUM_WORKERS": 4,
        "ASPECT_RATIO_GROUPING": True,
        "SAMPLER_TRAIN": "TrainingSampler",
        "REPEAT_THRESHOLD": 0.0,
        "REPEAT_SQRT": True,
        "FILTER_EMPTY_ANNOTATIONS": True,
    },
    "SOLVER": {
        "LR_SCHEDULER_NAME": "WarmupMultiStepLR",
        "MAX_ITER": 40000,
        "BASE_LR": 0.001,
        "BASE_LR_END": 0.0,
        "MOMENTUM": 0.9,
        "NESTEROV": False,
        "WEIGHT_DECAY": 0.0001,
        "WEIGHT_DECAY_NORM": 0.0,
        "GAMMA": 0.1,
        "STEPS": (30000,),
        "NUM_DECAYS": 3,
        "WARMUP_FACTOR": 1.0 / 1000,
        "WARMUP_ITERS": 1000,
        "WARMUP_METHOD": "linear",
        "RESCALE_INTERVAL": False,
        "CHECKPOINT_PERIOD": 5000,
        "IMS_PER_BATCH": 16,
        "REFERENCE_WORLD_SIZE": 0,
        "BIAS_LR_FACTOR": 1.0,
        "WEIGHT_DECAY_BIAS": None,  # None: same as WEIGHT_DECAY
        "CLIP_GRADIENTS": {
            "ENABLED": False,
            "CLIP_TYPE": "value",
            "CLIP_VALUE": 1.0,
            "NORM_TYPE": 2.0,
        },
        "AMP": {"ENABLED": False},
    },
    "TEST": {
        "EXPECTED_RESULTS": [],
        "EVAL_PERIOD": 0,
        "KEYPOINT_OKS_SIGMAS": [],
        "DETECTIONS_PER_IMAGE": 100,
        "AUG": {
            "ENABLED": False,
            "MIN_SIZES": (400, 500, 600, 700, 800, 900, 1000, 1100, 1200),
            "MAX_SIZE": 4000,
            "FLIP": True,
        },
        "PRECISE_BN": {"ENABLED": False, "NUM_ITER": 200},
    },
    "OUTPUT_DIR": "./output",
    "SEED": -1,
    "CUDNN_BENCHMARK": False,
    "FLOAT32_PRECISION": "",
    "VIS_PERIOD": 0,
    "GLOBAL": {"HACK": 1.0},
}

# Keys of Detectron2's DeepLab project (``add_deeplab_config``). Mask2Former's official training
# script applies it too, so dumped Mask2Former configs carry these keys.
DEEPLAB_DEFAULTS = {
    "INPUT": {"CROP": {"SINGLE_CATEGORY_MAX_AREA": _SINGLE_CATEGORY_MAX_AREA}},
    "SOLVER": {"POLY_LR_POWER": 0.9, "POLY_LR_CONSTANT_ENDING": 0.0},
    "MODEL": {
        "SEM_SEG_HEAD": {
            "LOSS_TYPE": "hard_pixel_mining",
            "PROJECT_FEATURES": ["res2"],
            "PROJECT_CHANNELS": [48],
            "ASPP_CHANNELS": 256,
            "ASPP_DILATIONS": [6, 12, 18],
            "ASPP_DROPOUT": 0.1,
            "USE_DEPTHWISE_SEPARABLE_CONV": False,
        },
        "RESNETS": {
            "RES4_DILATION": 1,
            "RES5_MULTI_GRID": [1, 2, 4],
            "STEM_TYPE": "deeplab",  # "basic" or "deeplab"
        },
    },
}

# Keys of the official ``add_maskformer2_config`` (MaskFormer v1 keys + Mask2Former additions).
MASKFORMER2_DEFAULTS = {
    "INPUT": {
        "DATASET_MAPPER_NAME": "mask_former_semantic",
        "COLOR_AUG_SSD": False,
        # Random crops are retried until no single class covers more than this crop fraction.
        "CROP": {"SINGLE_CATEGORY_MAX_AREA": _SINGLE_CATEGORY_MAX_AREA},
        "SIZE_DIVISIBILITY": -1,  # padding in the dataset mapper; -1 = none
        # Large-scale jitter (COCO mappers)
        "IMAGE_SIZE": 1024,
        "MIN_SCALE": 0.1,
        "MAX_SCALE": 2.0,
    },
    "SOLVER": {
        "WEIGHT_DECAY_EMBED": 0.0,
        "OPTIMIZER": "ADAMW",
        "BACKBONE_MULTIPLIER": 0.1,
        # MP-Former's train_net.py: with INSTANT_DROP, SOLVER.STEPS becomes (DROP_EP, DROP_EP + 15000)
        "INSTANT_DROP": False,
        "DROP_EP": 0,
    },
    "MODEL": {
        "MASK_FORMER": {
            # losses
            "DEEP_SUPERVISION": True,
            "NO_OBJECT_WEIGHT": 0.1,
            "CLASS_WEIGHT": 1.0,
            "DICE_WEIGHT": 1.0,
            "MASK_WEIGHT": 20.0,
            # transformer decoder
            "NHEADS": 8,
            "DROPOUT": 0.1,
            "DIM_FEEDFORWARD": 2048,
            "ENC_LAYERS": 0,
            "DEC_LAYERS": 6,
            "PRE_NORM": False,
            "HIDDEN_DIM": 256,
            "NUM_OBJECT_QUERIES": 100,
            "TRANSFORMER_IN_FEATURE": "res5",
            "ENFORCE_INPUT_PROJ": False,
            "TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
            # inference
            "TEST": {
                "SEMANTIC_ON": True,
                "INSTANCE_ON": False,
                "PANOPTIC_ON": False,
                "OBJECT_MASK_THRESHOLD": 0.0,
                "OVERLAP_THRESHOLD": 0.0,
                "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
            },
            # Images are padded to this in the model (some backbones report size_divisibility 0).
            "SIZE_DIVISIBILITY": 32,
            # PointRend-style point sampling for the mask losses
            "TRAIN_NUM_POINTS": 112 * 112,
            "OVERSAMPLE_RATIO": 3.0,
            "IMPORTANCE_SAMPLE_RATIO": 0.75,
            # MP-Former (mask-piloted training; keys and defaults of IDEA-Research/MP-Former's
            # add_maskformer2_config). Read only by MultiScaleMaskedTransformerDecoderMaskDN, and
            # only in training. DN_MODE: how the ground-truth masks of the MP queries are noised
            # ("points": random pixel flips, the released setting; "shift": the mask translated).
            # HEAD_DN: independent noise per attention head. ALL_LY_DN: MP attention masks in every
            # layer (else in the first four). LB_NOISE_RATIO: fraction of MP class labels replaced
            # by a random class (<= 0: none). DN_NO_LB: no classification loss on MP queries.
            # DN_RATIO is read only by official modes not implemented here ("patch", "points_MAE").
            # LAST_Q_RATIO is read only by the official MaskDNLYSmooth decoder, not implemented here.
            "LAST_Q_RATIO": 0.0,
            "DN_MODE": "base",
            "HEAD_DN": False,
            "ALL_LY_DN": False,
            "DN_RATIO": 0.5,
            "DN_NO_LB": False,
            "LB_NOISE_RATIO": -1.0,
            # SeMask: weight of the per-pixel cross-entropy on the backbone's semantic priors (loss_cate)
            "CATE_WEIGHT": 0.4,
        },
        # MP-Former: NUM_DN groups of MP queries (>= 100: a budget of queries, NUM_DN // most
        # ground-truth objects of an image in the batch); NOISE_SCALE: strength of the mask noise.
        "DN": {"NUM_DN": 5, "NOISE_SCALE": 0.2},
        "SEM_SEG_HEAD": {
            "MASK_DIM": 256,
            "TRANSFORMER_ENC_LAYERS": 0,
            "PIXEL_DECODER_NAME": "BasePixelDecoder",
            "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
            "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 4,
            "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
        },
        "SWIN": {
            "PRETRAIN_IMG_SIZE": 224,
            "PATCH_SIZE": 4,
            "EMBED_DIM": 96,
            "DEPTHS": [2, 2, 6, 2],
            "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7,
            "MLP_RATIO": 4.0,
            "QKV_BIAS": True,
            "QK_SCALE": None,
            "DROP_RATE": 0.0,
            "ATTN_DROP_RATE": 0.0,
            "DROP_PATH_RATE": 0.3,
            "APE": False,
            "PATCH_NORM": True,
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
            "USE_CHECKPOINT": False,
            # SeMask (D2SeMaskSwinTransformer): the window of the semantic attention after each
            # stage and the number of semantic-attention blocks per stage (SeMask-Mask2Former's keys)
            "SEM_WINDOW_SIZE": 7,
            "NUM_SEM_BLOCKS": 1,
        },
    },
}

# Keys of kMaX-DeepLab's ``add_kmax_deeplab_config`` (bytedance/kmax-deeplab), official defaults.
# ``get_cfg`` adds only the keys that Mask2Former lacks (MODEL.KMAX_DEEPLAB, MODEL.CONVNEXT); the
# official function, :func:`add_kmax_deeplab_config`, also sets the keys both projects define
# (INPUT.*, SOLVER.*) to kMaX's values, as the official one does. The kMaX configs under configs/
# therefore state the values of those shared keys that they rely on (e.g. WEIGHT_DECAY_EMBED).
KMAX_DEEPLAB_DEFAULTS = {
    "INPUT": {
        "DATASET_MAPPER_NAME": "coco_panoptic_kmaxdeeplab",
        "SIZE_DIVISIBILITY": -1,
        # the fixed [height, width] every input is zero-padded to (odd: align_corners resizes)
        "IMAGE_SIZE": [1281, 1281],
        "MIN_SCALE": 0.2,
        "MAX_SCALE": 2.0,
    },
    "SOLVER": {"WEIGHT_DECAY_EMBED": 0.05, "OPTIMIZER": "ADAMW", "BACKBONE_MULTIPLIER": 0.1},
    "MODEL": {
        "KMAX_DEEPLAB": {
            # the final layer's Hungarian matching is reused by every auxiliary layer
            "SHARE_FINAL_MATCHING": True,
            "SAVE_VIS_NUM": 0,  # panoptic visualisations the official evaluator saves
            "CHANNEL_LAST_FORMAT": False,  # run the backbone on a channels-last input
            # losses
            "DEEP_SUPERVISION": True,
            "NO_OBJECT_WEIGHT": 1e-5,
            "CLASS_WEIGHT": 3.0,
            "DICE_WEIGHT": 3.0,
            "MASK_WEIGHT": 0.3,
            "INSDIS_WEIGHT": 1.0,
            # > 0 builds the training-only auxiliary semantic predictor (its keys are in checkpoints)
            "AUX_SEMANTIC_WEIGHT": 1.0,
            # True: DeepLabv3+-style decoder (ASPP + two skips); False: one 5x5 depthwise block on res5
            "USE_AUX_SEMANTIC_DECODER": True,
            "PIXEL_INSDIS_TEMPERATURE": 1.5,
            "PIXEL_INSDIS_SAMPLE_K": 4096,
            "AUX_SEMANTIC_TEMPERATURE": 2.0,
            "AUX_SEMANTIC_SAMPLE_K": 4096,
            "MASKING_VOID_PIXEL": True,
            # ours: the training mapper pastes segments of a second training image on each sample
            # (all its things, a random subset of its stuff), as the official mapper always does;
            # False trains without (mask2former/data/dataset_mappers/copy_paste.py)
            "COPY_PASTE": True,
            # ours: a training sample with no segment or at most this many labelled pixels is drawn
            # again (the official mapper's constant 4096, at its IMAGE_SIZE)
            "MIN_LABELLED_PIXELS": 4096,
            "PIXEL_DEC": {
                "NAME": "kMaXPixelDecoder",
                "IN_FEATURES": ["res2", "res3", "res4", "res5"],
                # per stage, from the coarsest feature: blocks, block type, base width
                "DEC_LAYERS": [1, 5, 1, 1],
                "LAYER_TYPES": ["axial", "axial", "bottleneck", "bottleneck"],
                "DEC_CHANNELS": [512, 256, 128, 64],
                "DROP_PATH_PROB": 0.0,
            },
            "TRANS_DEC": {
                "NAME": "kMaXTransformerDecoder",
                # k-means layers on the stride-32, 16 and 8 pixel-decoder outputs
                "DEC_LAYERS": [2, 2, 2],
                "NUM_OBJECT_QUERIES": 128,
                # widths of those outputs (4x DEC_CHANNELS), then of the final stride-4 one
                "IN_CHANNELS": [2048, 1024, 512],
                "DROP_PATH_PROB": 0.0,
                # ours: how pixels are assigned to the cluster centres in the k-means update.
                # "argmax": kMaX-DeepLab's hard assignment; "softmax": CMT-DeepLab's clustering,
                # a softmax over the clusters (only that: not its pixel-feature update nor its
                # location-sensitive clustering)
                "ASSIGNMENT": "argmax",
            },
            "TEST": {
                "SEMANTIC_ON": False,
                "INSTANCE_ON": False,
                "PANOPTIC_ON": True,
                # a pixel belongs to a mask where that mask's softmax over queries exceeds this
                "PIXEL_CONFIDENCE_THRESHOLD": 0.4,
                "CLASS_THRESHOLD_THING": 0.7,
                "CLASS_THRESHOLD_STUFF": 0.5,
                # panoptic segments are placed in the order class_score**w_c * mask_score**w_m
                "REORDER_CLASS_WEIGHT": 1.0,
                "REORDER_MASK_WEIGHT": 1.0,
                "OVERLAP_THRESHOLD": 0.8,
                "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
            },
            "SIZE_DIVISIBILITY": -1,
        },
        "CONVNEXT": {
            "IN_CHANNELS": 3,
            "DEPTHS": [3, 3, 27, 3],
            "DIMS": [192, 384, 768, 1536],
            "DROP_PATH_RATE": 0.6,
            "LSIT": 1e-6,  # (sic) layer-scale init value
            "OUT_INDICES": [0, 1, 2, 3],
            "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        },
    },
}
