from . import transforms
from .build import (
    InferenceSampler,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
    reset_skipped_samples,
    skipped_samples,
)
from .catalog import DatasetCatalog, Metadata, MetadataCatalog, thing_contiguous_ids
from .dataset_mappers import (
    MAPPER_REGISTRY,
    BadSampleError,
    COCOInstanceNewBaselineDatasetMapper,
    PanoptickMaXDeepLabDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    build_augmentations,
    build_mapper,
    register_mapper,
)
from .datasets import (
    DatasetFormatError,
    load_coco_instances_json,
    load_coco_panoptic_json,
    load_sem_seg,
    register_coco_instances,
    register_coco_panoptic,
    register_sem_seg,
)

__all__ = [
    "DatasetCatalog",
    "Metadata",
    "MetadataCatalog",
    "thing_contiguous_ids",
    "transforms",
    "BadSampleError",
    "MaskFormerMapper",
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "COCOInstanceNewBaselineDatasetMapper",
    "PanoptickMaXDeepLabDatasetMapper",
    "MAPPER_REGISTRY",
    "build_mapper",
    "build_augmentations",
    "register_mapper",
    "build_detection_train_loader",
    "build_detection_test_loader",
    "get_detection_dataset_dicts",
    "TrainingSampler",
    "InferenceSampler",
    "skipped_samples",
    "reset_skipped_samples",
    "DatasetFormatError",
    "load_coco_panoptic_json",
    "load_coco_instances_json",
    "load_sem_seg",
    "register_coco_panoptic",
    "register_coco_instances",
    "register_sem_seg",
]

import os as _os

from .datasets.builtin import register_all_builtin
from .datasets.synthetic import register_synthetic

# built-in datasets are registered at import under $DETECTRON2_DATASETS (default ./datasets),
# as Detectron2 does; their files are only read (or, for the synthetic set, generated) on use
register_synthetic()
register_all_builtin()
# datasets described by the YAML files in $M2F_DATASETS_YAML (see datasets/custom.py)
if _os.environ.get("M2F_DATASETS_YAML", "").strip():
    from .datasets.custom import register_from_env

    register_from_env()
