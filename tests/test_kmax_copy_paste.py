"""kMaX-DeepLab's training-time copy-paste (mask2former/data/dataset_mappers/copy_paste.py) in its
mapper: what is pasted (things always, crowd never), ids, covered and merged segments, the
``is_real_pixels`` canvas, randomness through the loader's seeded ``rng``, bad second images.

The exact-geometry tests map without augmentation (``augmentations=[]`` for both images), so a
pasted pixel keeps its place; the loader tests use configs/synthetic/panoptic_kmax.yaml."""
import numpy as np
import pytest
import torch
from PIL import Image

import mask2former as m2f
from mask2former.data import BadSampleError, build_detection_train_loader, reset_skipped_samples, skipped_samples
from mask2former.data.build import _SerializedList, _TrainMapDataset
from mask2former.data.dataset_mappers import PanoptickMaXDeepLabDatasetMapper, build_mapper
from mask2former.data.dataset_mappers.copy_paste import CopyPaste, choose_pasted
from mask2former.data.ids import id2rgb
from tests.conftest import REPO

CIRCLE, SQUARE, SKY, GRASS = 0, 1, 2, 3  # contiguous ids: two thing classes, two stuff classes
IS_THING = {CIRCLE: True, SQUARE: True, SKY: False, GRASS: False}


def rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_entry(root, name, h, w, segments, colour):
    """A dataset dict (the loaders' form) of an (h, w) image filled with ``colour`` plus noise;
    ``segments``: (id, class, mask, iscrowd), painted in order (later ones on top)."""
    rng = np.random.default_rng(len(name) + colour)
    image = np.clip(colour + rng.integers(-3, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    ids = np.zeros((h, w), np.int64)
    sem = np.full((h, w), 255, np.uint8)
    for sid, cls, mask, _ in segments:
        ids[mask], sem[mask] = sid, cls
    files = {k: str(root / f"{name}_{k}.png") for k in ("image", "pan", "sem")}
    Image.fromarray(image).save(files["image"])
    Image.fromarray(id2rgb(ids)).save(files["pan"])
    Image.fromarray(sem).save(files["sem"])
    infos = [{"id": sid, "category_id": cls, "isthing": IS_THING[cls], "iscrowd": crowd}
             for sid, cls, _, crowd in segments]
    return {"file_name": files["image"], "image_id": name, "height": h, "width": w,
            "pan_seg_file_name": files["pan"], "sem_seg_file_name": files["sem"], "segments_info": infos}


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    h, w = 40, 40
    main = write_entry(root, "main", h, w, [
        (1, SKY, rect(h, w, 0, 0, 20, w), 0),
        (2, GRASS, rect(h, w, 20, 0, h, w), 0),
        (3, CIRCLE, rect(h, w, 22, 2, 30, 10), 0),  # left, not covered
        (4, SQUARE, rect(h, w, 4, 24, 10, 30), 0),  # covered by the source's circle 3
        (5, CIRCLE, rect(h, w, 30, 30, 36, 36), 1),  # crowd
    ], colour=40)
    # the same ids as the main image, for other segments: ids must not collide
    source = write_entry(root, "source", h, w, [
        (1, SKY, rect(h, w, 0, 0, 12, w) | rect(h, w, 31, 12, 34, 22), 0),  # a band in the main grass
        (2, GRASS, rect(h, w, 36, 0, h, w), 0),
        (3, CIRCLE, rect(h, w, 2, 22, 12, 32), 0),  # covers the main square
        (4, SQUARE, rect(h, w, 24, 24, 30, 30), 0),
        (6, SQUARE, rect(h, w, 14, 2, 20, 8), 1),  # crowd: never pasted
    ], colour=200)
    # smaller than the source in height, wider: the canvas is 40 x 50
    short = write_entry(root, "short", 30, 50, [
        (7, SKY, rect(30, 50, 0, 0, 30, 50), 0),
    ], colour=90)
    deep = write_entry(root, "deep", 40, 30, [
        (8, GRASS, rect(40, 30, 0, 0, 40, 30), 0),
        (9, SQUARE, rect(40, 30, 32, 4, 38, 12), 0),  # below the short image
    ], colour=160)
    return {"main": main, "source": source, "short": short, "deep": deep, "root": root}


def plain_mapper(pool):
    """The kMaX mapper without augmentation, its second images drawn from ``pool``."""
    return PanoptickMaXDeepLabDatasetMapper(True, augmentations=[], image_format="RGB",
                                            copy_paste=CopyPaste(augmentations=[], image_format="RGB", dataset=pool))


def targets(sample):
    inst = sample["instances"]
    return inst.gt_classes.tolist(), inst.gt_masks.numpy()


def gt_mask(entry, sid):
    from mask2former.data.ids import rgb2id

    return rgb2id(np.asarray(Image.open(entry["pan_seg_file_name"]))) == sid


def find_mask(masks, mask):
    return [i for i, m in enumerate(masks) if np.array_equal(m, mask)]


def samples(mapper, entry, n=12):
    return [mapper(entry, rng=np.random.default_rng([5, k])) for k in range(n)]


def test_pasted_things_keep_their_pixels_and_class_and_ids_do_not_collide(entries):
    main, source = entries["main"], entries["source"]
    src_image = np.asarray(Image.open(source["file_name"])).transpose(2, 0, 1)
    for s in samples(plain_mapper([source]), main):
        classes, masks = targets(s)
        for sid, cls in ((3, CIRCLE), (4, SQUARE)):  # every thing of the source, at its place
            m = gt_mask(source, sid)
            (i,) = find_mask(masks, m)
            assert classes[i] == cls
            assert np.array_equal(s["image"].numpy()[:, m], src_image[:, m])
        # the main circle 3 stays its own target beside the source's circle 3 (same id, same class)
        (i,) = find_mask(masks, gt_mask(main, 3))
        assert classes[i] == CIRCLE and classes.count(CIRCLE) == 2
        assert (masks.sum(axis=0) <= 1).all()  # the targets do not overlap


def test_fully_covered_main_segment_is_dropped(entries):
    for s in samples(plain_mapper([entries["source"]]), entries["main"]):
        classes, masks = targets(s)
        # the main square lay under the source's circle: only the pasted square is left
        assert classes.count(SQUARE) == 1
        assert find_mask(masks, gt_mask(entries["source"], 4))
        assert all(m.any() for m in masks)


def test_pasted_stuff_merges_into_the_main_segment_of_its_class(entries):
    main, source = entries["main"], entries["source"]
    main_sky, src_sky, src_circle = gt_mask(main, 1), gt_mask(source, 1), gt_mask(source, 3)
    seen = set()
    for s in samples(plain_mapper([source]), main, n=24):
        classes, masks = targets(s)
        assert classes.count(SKY) == 1 and classes.count(GRASS) == 1  # one target per stuff class
        sky = masks[classes.index(SKY)]
        pasted = bool((s["image"].numpy()[:, src_sky] > 150).all())  # the source's colour (200) shows
        seen.add(pasted)
        # the main sky less the pasted circle, plus the source's sky when that was pasted
        assert np.array_equal(sky, (main_sky & ~src_circle) | (src_sky if pasted else False))
    assert seen == {True, False}  # the stuff subset is random


def test_crowd_segments_are_neither_pasted_nor_targets(entries):
    main, source = entries["main"], entries["source"]
    main_image = np.asarray(Image.open(main["file_name"])).transpose(2, 0, 1)
    src_crowd, main_crowd = gt_mask(source, 6), gt_mask(main, 5)
    for s in samples(plain_mapper([source]), main):
        classes, masks = targets(s)
        # the source's crowd square is not pasted: the main image and its sky show there
        assert np.array_equal(s["image"].numpy()[:, src_crowd], main_image[:, src_crowd])
        assert masks[classes.index(SKY)][src_crowd].all()
        # the main crowd circle (which nothing of the source overlaps) belongs to no target
        assert not masks[:, main_crowd].any()


def test_canvas_spans_both_images_and_is_real_pixels_marks_them(entries):
    short, deep = entries["short"], entries["deep"]
    deep_image = np.asarray(Image.open(deep["file_name"])).transpose(2, 0, 1)
    square = np.zeros((40, 50), bool)
    square[:40, :30] = gt_mask(deep, 9)
    for s in samples(plain_mapper([deep]), short):
        classes, masks = targets(s)
        real = s["is_real_pixels"]
        assert real.dtype == torch.bool and tuple(real.shape) == tuple(s["image"].shape[1:]) == (40, 50)
        assert masks.shape[1:] == (40, 50) and tuple(s["sem_seg"].shape) == (40, 50)
        pasted = np.any(masks[[c != SKY for c in classes]], axis=0)
        expected = np.zeros((40, 50), bool)
        expected[:30] = True
        assert np.array_equal(real.numpy(), expected | pasted)
        # the square below the short image is pasted (image, class, semantic label); beyond both images: void
        assert find_mask(masks, square) and classes[find_mask(masks, square)[0]] == SQUARE
        assert np.array_equal(s["image"].numpy()[:, square], deep_image[:, square[:, :30]])
        assert (s["sem_seg"].numpy()[square] == SQUARE).all()
        assert (s["sem_seg"].numpy()[30:, 30:] == 255).all() and (s["image"].numpy()[:, 30:, 30:] == 0).all()


def test_choose_pasted_takes_every_thing_and_a_random_count_of_the_rest():
    things = [True, False, False, True, False]
    picks = [choose_pasted(things, np.random.default_rng(k)) for k in range(200)]
    assert all(p[[0, 3]].all() for p in picks)
    assert {int(p[[1, 2, 4]].sum()) for p in picks} == {0, 1, 2, 3}
    # the count is uniform in [0, n]: all of them as often as none
    stuff = np.array([choose_pasted([False] * 3, np.random.default_rng(k)).sum() for k in range(400)])
    assert [int((stuff == c).sum()) for c in range(4)] == pytest.approx([100] * 4, abs=30)
    assert not choose_pasted([], np.random.default_rng(0)).size


def test_missing_isthing_is_a_clear_error(entries):
    bare = dict(entries["source"], segments_info=[{k: v for k, v in s.items() if k != "isthing"}
                                                  for s in entries["source"]["segments_info"]])
    with pytest.raises(ValueError, match=r"'isthing'.*source_image\.png"):
        plain_mapper([bare])(entries["main"], rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- from the config
def kmax_cfg(**overrides):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "synthetic" / "panoptic_kmax_copy_paste.yaml"))
    opts = {"INPUT.IMAGE_SIZE": [65, 65], "SOLVER.IMS_PER_BATCH": 2, "DATALOADER.NUM_WORKERS": 0, "SEED": 3}
    opts.update(overrides)
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_config_switch_and_the_halved_scale_range():
    cfg = kmax_cfg()
    mapper = build_mapper(cfg, True)
    assert mapper.copy_paste is not None and mapper.needs_dataset
    resize = mapper.copy_paste.source_mapper.augmentations[0]
    assert (resize.min_scale, resize.max_scale) == (cfg.INPUT.MIN_SCALE / 2, cfg.INPUT.MAX_SCALE / 2)
    assert build_mapper(cfg, False).copy_paste is None  # inference: no copy-paste
    cfg.INPUT.SIZE_DIVISIBILITY = 32  # the mapper must not pad what it pastes on
    with pytest.raises(ValueError, match=r"INPUT\.SIZE_DIVISIBILITY=32.*MODEL\.KMAX_DEEPLAB\.COPY_PASTE False"):
        build_mapper(cfg, True)
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    cfg.MODEL.KMAX_DEEPLAB.COPY_PASTE = False
    assert build_mapper(cfg, True).copy_paste is None and not build_mapper(cfg, True).needs_dataset


def fingerprint(batch):
    return [(s["file_name"], tuple(s["image"].shape), int(s["image"].sum()), s["instances"].gt_classes.tolist(),
             int(s["instances"].gt_masks.sum()), int(s["is_real_pixels"].sum())) for s in batch]


def first_batches(cfg, dataset, n, start_iter=0):
    it = iter(build_detection_train_loader(cfg, dataset=dataset, start_iter=start_iter))
    return [fingerprint(next(it)) for _ in range(n)]


def test_loader_samples_are_a_function_of_the_seed_resume_and_workers_aside(entries):
    dataset = [entries[k] for k in ("main", "source", "short", "deep")]
    cfg = kmax_cfg()
    full = first_batches(cfg, dataset, 6)
    assert first_batches(cfg, dataset, 6) == full
    assert first_batches(cfg, dataset, 2, start_iter=4) == full[4:]  # a resumed run sees the same samples
    assert first_batches(kmax_cfg(**{"DATALOADER.NUM_WORKERS": 2}), dataset, 6) == full
    assert first_batches(kmax_cfg(SEED=4), dataset, 6) != full
    # without copy-paste the samples are others (and carry no is_real_pixels)
    off = iter(build_detection_train_loader(kmax_cfg(**{"MODEL.KMAX_DEEPLAB.COPY_PASTE": False}), dataset=dataset))
    assert all("is_real_pixels" not in s for s in next(off))


def test_one_image_dataset(entries):
    batch = next(iter(build_detection_train_loader(kmax_cfg(), dataset=[entries["source"]])))
    for s in batch:
        classes, masks = targets(s)
        assert masks.shape[1:] == tuple(s["image"].shape[1:]) == tuple(s["is_real_pixels"].shape)
        assert set(classes) <= {SKY, GRASS, CIRCLE, SQUARE} and masks.any(axis=(1, 2)).all()
        assert max(s["image"].shape[1:]) <= 65


def test_bad_second_image_is_counted_and_the_sample_mapped_again(entries, tmp_path):
    broken = dict(entries["deep"], file_name=str(tmp_path / "broken.png"))
    with open(broken["file_name"], "wb") as f:
        f.write(open(entries["deep"]["file_name"], "rb").read()[:40])  # truncated PNG
    with pytest.raises(BadSampleError) as e:
        plain_mapper([broken])(entries["main"], rng=np.random.default_rng(0))
    assert e.value.index == 0 and e.value.file == broken["file_name"] and e.value.reason == "corrupt_file"
    # in the loader: the second image is the bad entry, the main one is mapped again with new draws
    mapper = build_mapper(kmax_cfg(), True)
    dataset = _SerializedList([entries["main"], entries["source"], broken])
    mapper.bind_dataset(dataset)
    items = [_TrainMapDataset(dataset, mapper, 3, None)[(p, 0)] for p in range(16)]
    assert all(item.index == 0 and item.sample["file_name"] == entries["main"]["file_name"] for item in items)
    skips = [s for item in items for s in item.skips]
    assert len(skips) >= 3 and all(s[:3] == (2, broken["file_name"], "corrupt_file") for s in skips)
    # and the training loader counts them, without stopping
    reset_skipped_samples()
    it = iter(build_detection_train_loader(kmax_cfg(), dataset=[entries["main"], entries["source"], broken]))
    for _ in range(6):
        assert len(next(it)) == 2
    assert skipped_samples().get("corrupt_file", 0) >= 1
