"""kMaX-DeepLab's redraw of training samples with no segment or too few labelled pixels
(MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS, the official mapper's 4096): the mapper rejects such a
draw with reason ``few_labelled_pixels`` and the training loader draws another sample, without
counting the entry as a bad file."""
import numpy as np
import pytest

from mask2former.data import BadSampleError, build_detection_train_loader, reset_skipped_samples, skipped_samples
from mask2former.data.dataset_mappers import PanoptickMaXDeepLabDatasetMapper
from mask2former.data.image_io import FEW_LABELLED_PIXELS
from tests.test_kmax_copy_paste import CIRCLE, GRASS, SKY, kmax_cfg, rect, write_entry

H = W = 40


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("redraw")
    full = write_entry(root, "full", H, W, [(1, SKY, rect(H, W, 0, 0, 20, W), 0),
                                            (2, GRASS, rect(H, W, 20, 0, H, W), 0)], colour=60)
    # 16 labelled pixels, the rest unlabelled
    small = write_entry(root, "small", H, W, [(1, CIRCLE, rect(H, W, 4, 4, 8, 8), 0)], colour=90)
    small2 = write_entry(root, "small2", H, W, [(1, CIRCLE, rect(H, W, 10, 10, 14, 14), 0)], colour=120)
    crowd = write_entry(root, "crowd", H, W, [(1, CIRCLE, rect(H, W, 0, 0, 30, 30), 1)], colour=30)
    return {"full": full, "small": small, "small2": small2, "crowd": crowd}


def mapper(min_labelled_pixels):
    return PanoptickMaXDeepLabDatasetMapper(True, augmentations=[], image_format="RGB",
                                            min_labelled_pixels=min_labelled_pixels)


def test_mapper_rejects_too_few_labelled_pixels(pool):
    rng = np.random.default_rng(0)
    assert len(mapper(15)(pool["small"], rng=rng)["instances"]) == 1  # 16 > 15
    with pytest.raises(BadSampleError) as e:
        mapper(16)(pool["small"], rng=rng)  # at most 16: drawn again, as the official "<= 4096"
    assert e.value.reason == FEW_LABELLED_PIXELS and e.value.file == pool["small"]["file_name"]
    assert "16 labelled pixels" in e.value.detail and "MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS 16" in e.value.detail
    assert len(mapper(1000)(pool["full"], rng=rng)["instances"]) == 2  # 1600 labelled pixels


def test_mapper_rejects_a_sample_without_segments(pool):
    with pytest.raises(BadSampleError, match="0 segments"):
        mapper(0)(pool["crowd"], rng=np.random.default_rng(0))  # a crowd segment is no target


def test_loader_draws_again_without_counting_the_entries_as_bad(pool):
    cfg = kmax_cfg(**{"MODEL.KMAX_DEEPLAB.COPY_PASTE": False, "MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS": 100})
    dataset = [pool["small"], pool["full"], pool["small2"]]
    reset_skipped_samples()
    # two of the three entries always rejected: as bad files, that would stop training
    batches = [next(it) for it in [iter(build_detection_train_loader(cfg, dataset=dataset))] for _ in range(4)]
    assert all(s["file_name"] == pool["full"]["file_name"] for b in batches for s in b)
    assert skipped_samples().get(FEW_LABELLED_PIXELS, 0) >= 1
    again = [next(it) for it in [iter(build_detection_train_loader(cfg, dataset=dataset))] for _ in range(4)]
    assert [[int(s["image"].sum()) for s in b] for b in again] == [[int(s["image"].sum()) for s in b] for b in batches]


def test_a_dataset_of_only_rejected_samples_stops_with_a_message(pool):
    cfg = kmax_cfg(**{"MODEL.KMAX_DEEPLAB.COPY_PASTE": False, "MODEL.KMAX_DEEPLAB.MIN_LABELLED_PIXELS": 100})
    with pytest.raises(RuntimeError, match="in a row"):
        next(iter(build_detection_train_loader(cfg, dataset=[pool["small"], pool["small2"]])))
