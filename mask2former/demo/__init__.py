"""The demo as a library: run a model on images, a video or the webcam, draw, save and export.

    from mask2former.demo import Predictor, run_images
    from mask2former.utils.visualizer import Visualizer
    predictor = Predictor(cfg)                        # model + weights + test-time resizing
    visualizer = Visualizer(predictor.metadata, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    status = run_images(predictor, visualizer, ["photos/", "more/*.jpg"], "vis/", save_json=True)

Modules: ``predictor`` (:class:`Predictor`, also ``mask2former.engine.Predictor``), ``inputs``
(input expansion, output names, image reading, batching), ``video`` (capture, codec fallback for
writing, progress), ``display`` (windows), ``export`` (COCO panoptic PNG + JSON, COCO RLE
instances JSON, semantic PNGs; atomic writes), ``run`` (the image / video / webcam loops).
``demo/demo.py`` is the command line over them.
"""
from .display import close_windows, display_available, no_display_reason, show
from .export import (
    DatasetCategoryIds,
    InstancesExporter,
    PanopticExporter,
    PredictionExporter,
    SemSegExporter,
)
from .inputs import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    batched,
    expand_inputs,
    is_image_file_name,
    output_paths,
    readable_images,
    video_output_path,
)
from .predictor import Predictor
from .run import describe, draw, run_images, run_stream, run_video, run_webcam
from .video import VIDEO_CODECS, Progress, open_video, open_video_writer, open_webcam, read_frames

__all__ = [
    "Predictor",
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "VIDEO_CODECS",
    "batched",
    "expand_inputs",
    "is_image_file_name",
    "output_paths",
    "readable_images",
    "video_output_path",
    "open_video",
    "open_webcam",
    "open_video_writer",
    "read_frames",
    "Progress",
    "display_available",
    "no_display_reason",
    "show",
    "close_windows",
    "DatasetCategoryIds",
    "PanopticExporter",
    "InstancesExporter",
    "SemSegExporter",
    "PredictionExporter",
    "describe",
    "draw",
    "run_images",
    "run_stream",
    "run_video",
    "run_webcam",
]
