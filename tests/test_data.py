"""Data pipeline: dataset loaders, augmentations, mappers, training/inference loaders."""
import json
import logging
import os
import shutil

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from mask2former.config import get_cfg
from mask2former.data import (
    MAPPER_REGISTRY,
    BadSampleError,
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    DatasetCatalog,
    DatasetFormatError,
    MaskFormerInstanceDatasetMapper,
    MaskFormerMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    MetadataCatalog,
    TrainingSampler,
    build_detection_test_loader,
    build_augmentations,
    build_detection_train_loader,
    build_mapper,
    load_coco_instances_json,
    load_coco_panoptic_json,
    load_sem_seg,
    register_coco_instances,
    register_coco_panoptic,
    register_mapper,
    register_sem_seg,
    reset_skipped_samples,
    skipped_samples,
)
from mask2former.data import transforms as T
from mask2former.data.build import get_detection_dataset_dicts
from mask2former.data.dataset_mappers import read_image
from mask2former.data.samplers import aspect_groups as _aspect_groups

# --------------------------------------------------------------------------- #
# A tiny COCO-style dataset
# --------------------------------------------------------------------------- #
# dataset category ids -> contiguous: person 0, car 1 (things), sky 2, grass 3 (stuff)
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 7, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 9, "name": "grass", "isthing": 0, "color": [0, 255, 0]},
]
META = {
    "thing_classes": ["person", "car"],
    "stuff_classes": ["person", "car", "sky", "grass"],
    "thing_dataset_id_to_contiguous_id": {1: 0, 3: 1},
    "stuff_dataset_id_to_contiguous_id": {7: 2, 9: 3},
}
CONTIG = {1: 0, 3: 1, 7: 2, 9: 3}
SIZES = [(50, 70), (60, 45), (40, 66)]  # (H, W); none a multiple of 32


def _rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _scene(k, h, w):
    """Objects of image k: list of (kind, category, full mask, crowd, polygon or None)."""
    objs = [
        ("stuff", 7, _rect(h, w, 0, 0, h // 2, w), 0, None),
        ("stuff", 9, _rect(h, w, h // 2, 0, h, w), 0, None),
    ]
    y0, x0 = 5 + k, 8 + 2 * k
    y1, x1 = y0 + 20, x0 + 15
    objs.append(("thing", 1, _rect(h, w, y0, x0, y1, x1), 0, [x0, y0, x1, y0, x1, y1, x0, y1]))
    objs.append(("thing", 3, _disk(h, w, h // 2 + 3, w // 2 + 4, 9), 0, None))  # overlaps
    if k == 0:
        objs.append(("thing", 3, _rect(h, w, h - 12, w - 20, h - 4, w - 4), 1, None))  # crowd
    return objs


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    dirs = {n: root / n for n in ("train2017", "panoptic_train2017", "panoptic_semseg_train2017",
                                 "annotations")}
    for d in dirs.values():
        d.mkdir()
    images, pan_anns, inst_anns = [], [], []
    rng = np.random.default_rng(0)
    ann_id = 1
    truth = {}
    for k, (h, w) in enumerate(SIZES):
        image_id = 100 + k
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(dirs["train2017"] / f"{image_id:012d}.jpg", quality=95)
        ids = np.zeros((h, w), np.int64)
        sem = np.full((h, w), 255, np.uint8)
        segs = []
        for j, (kind, cat, mask, crowd, poly) in enumerate(_scene(k, h, w)):
            sid = 70000 + 37 * j + k  # needs all three PNG channels
            ids[mask] = sid
            sem[mask] = CONTIG[cat]
            segs.append({"id": sid, "category_id": cat, "iscrowd": crowd,
                         "area": int(mask.sum()), "bbox": [0, 0, 1, 1]})
            if kind == "thing":
                ys, xs = np.nonzero(mask)
                ann = {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                       "area": int(mask.sum()),
                       "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]}
                if poly is not None:
                    ann["segmentation"] = [poly, [1, 1, 2, 2]]  # second polygon is invalid
                elif crowd:  # uncompressed RLE
                    ann["segmentation"] = _uncompressed_rle(mask)
                else:
                    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                    ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                inst_anns.append(ann)
                ann_id += 1
        ids[2:4, 2:6] = 0  # a VOID patch
        sem[2:4, 2:6] = 255
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=2).astype(np.uint8)
        png = f"{image_id:012d}.png"
        Image.fromarray(rgb).save(dirs["panoptic_train2017"] / png)
        Image.fromarray(sem).save(dirs["panoptic_semseg_train2017"] / png)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": png, "segments_info": segs})
        truth[image_id] = {"ids": ids, "sem": sem, "segs": segs, "img": img}
    cats = [{k: c[k] for k in ("id", "name", "isthing")} for c in CATEGORIES]
    pan_json = dirs["annotations"] / "panoptic_train2017.json"
    pan_json.write_text(json.dumps({"images": images, "annotations": pan_anns, "categories": cats},
                                   indent=1))
    inst_json = dirs["annotations"] / "instances_train2017.json"
    inst_json.write_text(json.dumps({"images": images, "annotations": inst_anns,
                                     "categories": [c for c in cats if c["isthing"]]}))
    return {"root": root, "truth": truth, "pan_json": str(pan_json), "inst_json": str(inst_json),
            **{k: str(v) for k, v in dirs.items()}}


def _uncompressed_rle(mask):
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _pan_dicts(c):
    return load_coco_panoptic_json(c["pan_json"], c["train2017"], c["panoptic_train2017"], META,
                                   c["panoptic_semseg_train2017"])


def _inst_dicts(c):
    return load_coco_instances_json(c["inst_json"], c["train2017"], META)


def _sem_dicts(c):
    return load_sem_seg(c["panoptic_semseg_train2017"], c["train2017"])


def _cfg(**kw):
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 200
    cfg.INPUT.IMAGE_SIZE = 64
    cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE = 0.5, 1.5
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SEED = 7
    for k, v in kw.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


# --------------------------------------------------------------------------- #
# Loaders and registration
# --------------------------------------------------------------------------- #
def test_load_coco_panoptic(coco):
    dicts = _pan_dicts(coco)
    assert [d["image_id"] for d in dicts] == [100, 101, 102]
    d = dicts[0]
    assert d["file_name"] == os.path.join(coco["train2017"], "000000000100.jpg")
    assert d["pan_seg_file_name"] == os.path.join(coco["panoptic_train2017"], "000000000100.png")
    assert d["sem_seg_file_name"].startswith(coco["panoptic_semseg_train2017"])
    assert (d["height"], d["width"]) == SIZES[0]
    cats = [(s["category_id"], s["isthing"], s["iscrowd"]) for s in d["segments_info"]]
    assert cats == [(2, False, 0), (3, False, 0), (0, True, 0), (1, True, 0), (1, True, 1)]
    # the id table of the metadata is used as given (raw file is untouched)
    assert json.load(open(coco["pan_json"]))["annotations"][0]["segments_info"][0]["category_id"] == 7


def test_load_coco_instances(coco):
    dicts = _inst_dicts(coco)
    assert len(dicts) == 3
    d = dicts[0]
    assert (d["height"], d["width"], d["image_id"]) == (*SIZES[0], 100)
    annos = d["annotations"]
    assert [a["category_id"] for a in annos] == [0, 1, 1]
    assert [a["iscrowd"] for a in annos] == [0, 0, 1]
    assert all(a["bbox_mode"] == 1 and len(a["bbox"]) == 4 for a in annos)
    assert annos[0]["segmentation"] == [[8, 5, 23, 5, 23, 25, 8, 25]]  # invalid polygon dropped
    assert isinstance(annos[1]["segmentation"], dict)
    crowd = annos[2]["segmentation"]
    assert isinstance(crowd, dict) and not isinstance(crowd["counts"], list)  # compressed
    truth = coco["truth"][100]
    assert np.array_equal(mask_util.decode(crowd).astype(bool), truth["ids"] == truth["segs"][4]["id"])


def test_load_sem_seg(coco, tmp_path):
    dicts = _sem_dicts(coco)
    assert len(dicts) == 3
    for d in dicts:
        base = os.path.splitext(os.path.basename(d["file_name"]))[0]
        assert d["sem_seg_file_name"] == os.path.join(coco["panoptic_semseg_train2017"], base + ".png")
    # aspect groups of dicts without height/width come from the image headers
    assert _aspect_groups(dicts).tolist() == [0, 1, 0]
    # unmatched files are left out
    img_dir, gt_dir = tmp_path / "img", tmp_path / "gt"
    shutil.copytree(coco["train2017"], img_dir)
    shutil.copytree(coco["panoptic_semseg_train2017"], gt_dir)
    os.remove(gt_dir / "000000000101.png")
    assert len(load_sem_seg(str(gt_dir), str(img_dir))) == 2


def test_register(coco):
    names = ["_t_pan", "_t_inst", "_t_sem"]
    try:
        register_coco_panoptic("_t_pan", META, coco["train2017"], coco["panoptic_train2017"],
                               coco["pan_json"], coco["panoptic_semseg_train2017"], coco["inst_json"])
        register_coco_instances("_t_inst", {}, coco["inst_json"], coco["train2017"])
        register_sem_seg("_t_sem", {"stuff_classes": META["stuff_classes"]}, coco["train2017"],
                         coco["panoptic_semseg_train2017"])
        assert len(DatasetCatalog.get("_t_pan")) == 3
        m = MetadataCatalog.get("_t_pan")
        assert m.evaluator_type == "coco_panoptic_seg" and m.ignore_label == 255
        assert m.label_divisor == 1000 and m.panoptic_json == coco["pan_json"]
        assert m.json_file == coco["inst_json"] and m.sem_seg_root == coco["panoptic_semseg_train2017"]
        assert m.thing_classes == ["person", "car"]
        # instances: without a table, the json's categories are enumerated and recorded
        d = DatasetCatalog.get("_t_inst")
        assert [a["category_id"] for a in d[0]["annotations"]] == [0, 1, 1]
        mi = MetadataCatalog.get("_t_inst")
        assert mi.evaluator_type == "coco" and mi.thing_classes == ["person", "car"]
        assert mi.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
        assert len(DatasetCatalog.get("_t_sem")) == 3
        assert MetadataCatalog.get("_t_sem").evaluator_type == "sem_seg"
    finally:
        for n in names:
            if n in DatasetCatalog:
                DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_malformed_json_names_file_and_position(coco, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(DatasetFormatError) as e:
        load_coco_panoptic_json(str(bad), coco["train2017"], coco["panoptic_train2017"], META)
    msg = str(e.value)
    assert str(bad) in msg and "line 3" in msg and "column 19" in msg
    with pytest.raises(DatasetFormatError, match="line 3"):
        load_coco_instances_json(str(bad), coco["train2017"], META)


def test_missing_directory_lists_layout(coco, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_coco_panoptic_json(coco["pan_json"], str(tmp_path / "nope"), coco["panoptic_train2017"],
                                META)
    assert "nope" in str(e.value) and "Expected layout" in str(e.value)
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        load_sem_seg(str(tmp_path / "nope"), coco["train2017"])


def test_unknown_category_is_reported(coco):
    with pytest.raises(DatasetFormatError, match="category_id 9"):
        load_coco_panoptic_json(coco["pan_json"], coco["train2017"], coco["panoptic_train2017"],
                                {"thing_dataset_id_to_contiguous_id": {1: 0, 3: 1},
                                 "stuff_dataset_id_to_contiguous_id": {7: 2}})


# --------------------------------------------------------------------------- #
# Transforms
# --------------------------------------------------------------------------- #
def test_resize_shortest_edge_shapes():
    assert T.ResizeShortestEdge.get_output_shape(480, 640, 800, 1333) == (800, 1067)
    assert T.ResizeShortestEdge.get_output_shape(100, 1000, 800, 1333) == (133, 1333)
    aug = T.ResizeShortestEdge((10, 20), 1000, "range")
    rng = np.random.default_rng(0)
    sizes = {min(aug.get_transform(T.AugInput(np.zeros((30, 40, 3), np.uint8)), rng).new_h, 99)
             for _ in range(200)}
    assert sizes == set(range(10, 21))


def test_resize_nearest_matches_pil():
    seg = np.random.default_rng(0).integers(0, 200, (13, 17), dtype=np.uint8)
    for size in [(26, 34), (7, 9), (20, 11)]:
        ours = T.resize_nearest(seg, *size)
        pil = np.asarray(Image.fromarray(seg).resize(size[::-1], Image.NEAREST))
        assert np.array_equal(ours, pil)


def test_color_aug_ssd_rgb_bgr_consistent():
    img = np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    for seed in range(6):
        t_bgr = T.ColorAugSSD("BGR").get_transform(T.AugInput(img), np.random.default_rng(seed))
        t_rgb = T.ColorAugSSD("RGB").get_transform(T.AugInput(img), np.random.default_rng(seed))
        out_bgr = t_bgr.apply_image(img)
        out_rgb = t_rgb.apply_image(img[:, :, ::-1].copy())
        assert out_bgr.dtype == np.uint8 and out_bgr.shape == img.shape
        assert np.array_equal(out_bgr, out_rgb[:, :, ::-1])
        seg = np.arange(72).reshape(8, 9)
        assert np.array_equal(t_bgr.apply_segmentation(seg), seg)
    t = T.ColorAugSSDTransform("BGR", 10.0, None, None, None, True)
    assert np.array_equal(t.apply_image(np.full((2, 2, 3), 250, np.uint8)), np.full((2, 2, 3), 255))


def test_category_area_crop_constraint():
    sem = np.zeros((20, 60), np.uint8)
    sem[:, 30:] = 1
    aug = T.RandomCropCategoryAreaConstraint("absolute", (20, 30), 0.7, 255)
    plain = T.RandomCrop("absolute", (20, 30))

    def ok(t):
        _, counts = np.unique(t.apply_segmentation(sem), return_counts=True)
        return len(counts) > 1 and counts.max() < 0.7 * counts.sum()

    n_con = sum(ok(aug.get_transform(T.AugInput(sem[..., None], sem), np.random.default_rng(s)))
                for s in range(100))
    n_plain = sum(ok(plain.get_transform(T.AugInput(sem[..., None], sem), np.random.default_rng(s)))
                  for s in range(100))
    assert n_con >= 95 and n_plain <= 60

    # the ignore label does not count as a category: half ignore + one class never qualifies,
    # so all 10 windows are tried
    sem2 = np.full((10, 10), 255, np.uint8)
    sem2[:, 5:] = 3
    for ignored, expected_draws in [(255, 10), (None, 1)]:
        a = T.RandomCropCategoryAreaConstraint("absolute", (10, 10), 0.7, ignored)
        calls = []
        orig = a._window
        a._window = lambda *args: calls.append(1) or orig(*args)
        a.get_transform(T.AugInput(sem2[..., None], sem2), np.random.default_rng(0))
        assert len(calls) == expected_draws


def test_crop_types():
    rng = np.random.default_rng(0)
    inp = T.AugInput(np.zeros((100, 200, 3), np.uint8))
    t = T.RandomCrop("relative", (0.5, 0.25)).get_transform(inp, rng)
    assert (t.h, t.w) == (50, 50)
    t = T.RandomCrop("absolute", (300, 64)).get_transform(inp, rng)
    assert (t.h, t.w) == (100, 64)
    for _ in range(20):
        t = T.RandomCrop("relative_range", (0.5, 0.5)).get_transform(inp, rng)
        assert 50 <= t.h <= 100 and 100 <= t.w <= 200
        t = T.RandomCrop("absolute_range", (30, 80)).get_transform(inp, rng)
        assert 30 <= t.h <= 80 and 30 <= t.w <= 80
        assert 0 <= t.y0 <= 100 - t.h and 0 <= t.x0 <= 200 - t.w


def test_read_image_exif_orientation(tmp_path):
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255  # left stripe
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=100)
    rgb = read_image(str(path), "RGB")
    assert rgb.shape == (20, 10, 3)
    assert rgb[:5, :, 0].mean() > 200 and rgb[-5:, :, 0].mean() < 50  # stripe now on top
    bgr = read_image(str(path), "BGR")
    assert np.array_equal(bgr, rgb[:, :, ::-1])


# --------------------------------------------------------------------------- #
# Mappers
# --------------------------------------------------------------------------- #
def _check_sample(s, n_pad_multiple=None):
    img, inst = s["image"], s["instances"]
    assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
    h, w = img.shape[1:]
    assert inst.image_size == (h, w)
    assert inst.gt_classes.dtype == torch.int64
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (len(inst), h, w)
    if n_pad_multiple:
        assert h % n_pad_multiple == 0 and w % n_pad_multiple == 0
    if "sem_seg" in s:
        assert s["sem_seg"].dtype == torch.int64 and s["sem_seg"].shape == (h, w)


def test_semantic_mapper_padding_and_targets(coco):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_semantic", INPUT__SIZE_DIVISIBILITY=32,
               INPUT__MIN_SIZE_TRAIN=(45,))
    mapper = build_mapper(cfg, True)
    for d in _sem_dicts(coco):
        s = mapper(d, rng=np.random.default_rng(0))
        _check_sample(s, 32)
        raw_h, raw_w = np.asarray(Image.open(d["file_name"])).shape[:2]
        new_h, new_w = T.ResizeShortestEdge.get_output_shape(raw_h, raw_w, 45, 200)
        H, W = s["image"].shape[1:]
        assert (H, W) == (-(-new_h // 32) * 32, -(-new_w // 32) * 32) and (H, W) != (new_h, new_w)
        sem = s["sem_seg"]
        assert (sem[new_h:] == 255).all() and (sem[:, new_w:] == 255).all()
        assert (s["image"][:, new_h:] == 128).all() and (s["image"][:, :, new_w:] == 128).all()
        labels = sorted(set(sem.unique().tolist()) - {255})
        assert s["instances"].gt_classes.tolist() == labels
        for c, m in zip(labels, s["instances"].gt_masks):
            assert torch.equal(m, sem == c)
        assert (s["height"], s["width"]) == (raw_h, raw_w)


def _expected_pan(truth_ids, tfm):
    return T.apply_segmentation(tfm, truth_ids, 0)


@pytest.mark.parametrize("name", ["mask_former_panoptic", "coco_panoptic_lsj"])
def test_panoptic_mapper_masks_match_gt(coco, name):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME=name, INPUT__SIZE_DIVISIBILITY=32, INPUT__CROP__ENABLED=True,
               INPUT__CROP__TYPE="absolute", INPUT__CROP__SIZE=[40, 40],
               INPUT__CROP__SINGLE_CATEGORY_MAX_AREA=0.8)
    mapper = build_mapper(cfg, True)
    dicts = _pan_dicts(coco)
    for seed in range(4):
        for d in dicts:
            s, tfm = mapper.map_with_transforms(d, np.random.default_rng(seed))
            _check_sample(s, 32)
            truth = coco["truth"][d["image_id"]]
            pan = _expected_pan(truth["ids"], tfm)
            H, W = s["image"].shape[1:]
            if name == "coco_panoptic_lsj":
                assert (H, W) == (64, 64) and s["instances"].gt_boxes.tensor.shape == (len(s["instances"]), 4)
            pan_p = np.zeros((H, W), pan.dtype)
            pan_p[: pan.shape[0], : pan.shape[1]] = pan
            segs = [x for x in truth["segs"] if not x["iscrowd"]]
            assert s["instances"].gt_classes.tolist() == [CONTIG[x["category_id"]] for x in segs]
            for seg, m in zip(segs, s["instances"].gt_masks):
                assert np.array_equal(m.numpy(), pan_p == seg["id"])
            # the image went through the masks' transform (its pixels, not only its size), then
            # was padded with 128 to (H, W)
            image = tfm.apply_image(read_image(d["file_name"], mapper.image_format))
            assert image.shape[:2] == pan.shape
            got = s["image"].permute(1, 2, 0).numpy()
            assert np.array_equal(got[: pan.shape[0], : pan.shape[1]], image)
            assert (got[pan.shape[0]:] == 128).all() and (got[:, pan.shape[1]:] == 128).all()
            # semantic map (from the semantic PNGs) agrees with the panoptic masks
            sem = s["sem_seg"].numpy()
            for c, m in zip(s["instances"].gt_classes.tolist(), s["instances"].gt_masks.numpy()):
                assert (sem[m] == c).all()


def test_panoptic_mapper_independent_geometry(coco):
    """Exact 2x upscale (+ optional flip) checked against numpy, without the library transform."""
    dicts = _pan_dicts(coco)
    flips = set()
    for seed in range(6):
        for d in dicts:
            h, w = d["height"], d["width"]
            cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic",
                       INPUT__MIN_SIZE_TRAIN=(2 * min(h, w),), INPUT__MAX_SIZE_TRAIN=1000)
            s, tfm = build_mapper(cfg, True).map_with_transforms(d, np.random.default_rng(seed))
            flipped = any(isinstance(t, T.HFlipTransform) for t in tfm.transforms)
            flips.add(flipped)
            truth = coco["truth"][d["image_id"]]
            ids = truth["ids"].repeat(2, 0).repeat(2, 1)
            if flipped:
                ids = ids[:, ::-1]
            segs = [x for x in truth["segs"] if not x["iscrowd"]]
            for seg, m in zip(segs, s["instances"].gt_masks.numpy()):
                assert np.array_equal(m, ids == seg["id"])
            # image flipped together with the masks: compare to a plain 2x resize of the original
            img = read_image(d["file_name"], "BGR")
            ref = np.asarray(Image.fromarray(img).resize((2 * w, 2 * h), Image.BILINEAR))
            if flipped:
                ref = ref[:, ::-1]
            assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), ref)
    assert flips == {True, False}


@pytest.mark.parametrize("name", ["mask_former_instance", "coco_instance_lsj"])
def test_instance_mapper(coco, name):
    dicts = _inst_dicts(coco)
    for seed in range(4):
        for d in dicts:
            h, w = d["height"], d["width"]
            if name == "mask_former_instance":  # exact 2x upscale: comparable with numpy
                cfg = _cfg(INPUT__DATASET_MAPPER_NAME=name, INPUT__MIN_SIZE_TRAIN=(2 * min(h, w),),
                           INPUT__MAX_SIZE_TRAIN=1000, INPUT__SIZE_DIVISIBILITY=32)
            else:
                cfg = _cfg(INPUT__DATASET_MAPPER_NAME=name)
            s, tfm = build_mapper(cfg, True).map_with_transforms(d, np.random.default_rng(seed))
            _check_sample(s)
            truth = coco["truth"][d["image_id"]]
            full = [m for kind, _, m, crowd, _ in _scene(d["image_id"] - 100, h, w)
                    if kind == "thing" and not crowd]
            inst = s["instances"]
            H, W = s["image"].shape[1:]
            if name == "coco_instance_lsj":
                assert (H, W) == (64, 64)
                assert inst.gt_masks.flatten(1).any(1).all()  # empties dropped
                assert len(inst.gt_boxes) == len(inst)
                continue
            assert inst.gt_classes.tolist() == [0, 1]  # crowd excluded
            flipped = any(isinstance(t, T.HFlipTransform) for t in tfm.transforms)
            for m, full_mask in zip(inst.gt_masks.numpy(), full):
                exp = full_mask.repeat(2, 0).repeat(2, 1)
                if flipped:
                    exp = exp[:, ::-1]
                assert np.array_equal(m[: 2 * h, : 2 * w], exp)
                assert not m[2 * h:].any() and not m[:, 2 * w:].any()
            del truth


def test_flip_moves_image_and_masks_together(coco):
    d = _pan_dicts(coco)[0]
    truth = coco["truth"][100]
    img = read_image(d["file_name"], "BGR")
    for aug, flip in [(T.RandomFlip(1.0), lambda a: a[:, ::-1]),
                      (T.RandomFlip(1.0, horizontal=False, vertical=True), lambda a: a[::-1])]:
        mapper = MaskFormerMapper(True, augmentations=[aug], task="panoptic")
        s = mapper(d)
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), flip(img))
        segs = [x for x in truth["segs"] if not x["iscrowd"]]
        for seg, m in zip(segs, s["instances"].gt_masks.numpy()):
            assert np.array_equal(m, flip(truth["ids"] == seg["id"]))
        assert np.array_equal(s["sem_seg"].numpy(), flip(truth["sem"]))


def test_color_aug_and_crop_in_semantic_mapper(coco):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_semantic", INPUT__COLOR_AUG_SSD=True,
               INPUT__CROP__ENABLED=True, INPUT__CROP__TYPE="absolute", INPUT__CROP__SIZE=[32, 32],
               INPUT__SIZE_DIVISIBILITY=32, INPUT__CROP__SINGLE_CATEGORY_MAX_AREA=0.75)
    mapper = build_mapper(cfg, True)
    kinds = [type(a).__name__ for a in mapper.augmentations]
    assert kinds == ["ResizeShortestEdge", "RandomCropCategoryAreaConstraint", "ColorAugSSD",
                     "RandomFlip"]
    for d in _sem_dicts(coco):
        s = mapper(d, rng=np.random.default_rng(3))
        _check_sample(s, 32)
        assert s["image"].shape[1:] == (32, 32)


def test_empty_annotation_gives_zero_instances(coco):
    d = dict(_pan_dicts(coco)[1])
    d["segments_info"] = []
    s = build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic"), True)(d)
    assert len(s["instances"]) == 0
    assert s["instances"].gt_masks.shape == (0, *s["image"].shape[1:])
    d = dict(_inst_dicts(coco)[0])
    d["annotations"] = [a for a in d["annotations"] if a["iscrowd"]]
    s = build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="mask_former_instance"), True)(d)
    assert len(s["instances"]) == 0 and s["instances"].gt_classes.shape == (0,)


def test_inference_mapper(coco):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="coco_panoptic_lsj", INPUT__SIZE_DIVISIBILITY=32)
    mapper = build_mapper(cfg, False)
    d = _pan_dicts(coco)[0]
    s = mapper(d)
    assert s["image"].shape == (3, 32, 45)  # shorter side -> MIN_SIZE_TEST, no padding
    assert (s["height"], s["width"]) == SIZES[0] and s["image_id"] == 100
    assert "instances" not in s


def test_unknown_mapper_name():
    with pytest.raises(KeyError, match="mask_former_semantic"):
        build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="nope"), True)


# --------------------------------------------------------------------------- #
# The mapper registry and the official mapper classes
# --------------------------------------------------------------------------- #
OFFICIAL_MAPPERS = [  # INPUT.DATASET_MAPPER_NAME, official class, task, style, dicts
    ("mask_former_semantic", MaskFormerSemanticDatasetMapper, "semantic", "resize_crop", _sem_dicts),
    ("mask_former_panoptic", MaskFormerPanopticDatasetMapper, "panoptic", "resize_crop", _pan_dicts),
    ("mask_former_instance", MaskFormerInstanceDatasetMapper, "instance", "resize_crop", _inst_dicts),
    ("coco_panoptic_lsj", COCOPanopticNewBaselineDatasetMapper, "panoptic", "lsj", _pan_dicts),
    ("coco_instance_lsj", COCOInstanceNewBaselineDatasetMapper, "instance", "lsj", _inst_dicts),
]


@pytest.mark.parametrize("name,cls,task,style,_", OFFICIAL_MAPPERS)
def test_official_mapper_names_resolve(name, cls, task, style, _):
    assert MAPPER_REGISTRY.get(name) is cls and MAPPER_REGISTRY[name] is cls
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME=name, INPUT__CROP__ENABLED=True, INPUT__COLOR_AUG_SSD=True)
    mapper = build_mapper(cfg, True)
    assert type(mapper) is cls and isinstance(mapper, MaskFormerMapper)
    assert mapper.task == task and mapper.is_train and mapper.name == name
    kinds = [type(a) for a in mapper.augmentations]
    if style == "lsj":
        assert kinds == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
        assert mapper.with_boxes and mapper.filter_empty_instances == (task == "instance")
    else:
        crop = T.RandomCrop if task == "instance" else T.RandomCropCategoryAreaConstraint
        assert kinds == [T.ResizeShortestEdge, crop, T.ColorAugSSD, T.RandomFlip]
        assert not mapper.with_boxes and not mapper.filter_empty_instances
    test_mapper = build_mapper(cfg, False)
    assert type(test_mapper) is cls and not test_mapper.is_train
    assert [type(a) for a in test_mapper.augmentations] == [T.ResizeShortestEdge]


def _same_sample(a, b):
    assert a.keys() == b.keys()
    assert torch.equal(a["image"], b["image"])
    if "instances" in a:
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
        assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks)
    if "sem_seg" in a:
        assert torch.equal(a["sem_seg"], b["sem_seg"])


@pytest.mark.parametrize("name,cls,task,style,dicts", OFFICIAL_MAPPERS)
def test_official_classes_construct_from_cfg_like_the_registry(coco, name, cls, task, style, dicts):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME=name, INPUT__CROP__ENABLED=True,
               INPUT__CROP__SIZE=[0.6, 0.6], INPUT__SIZE_DIVISIBILITY=32)
    d = dicts(coco)[1]
    for is_train in (True, False):
        official = cls(cfg, is_train=is_train)
        assert official.is_train == is_train and official.size_divisibility == 32
        assert repr(official.augmentations) == repr(build_mapper(cfg, is_train).augmentations)
        ref = build_mapper(cfg, is_train)(d, rng=np.random.default_rng(5))
        _same_sample(official(d, rng=np.random.default_rng(5)), ref)
        # the official keyword form, and the core with the same settings, give the same sample
        augs = build_augmentations(cfg, is_train, style, category_area_crop=task != "instance")
        by_keywords = cls(is_train, augmentations=augs, image_format="BGR", ignore_label=255,
                          size_divisibility=32)
        core = MaskFormerMapper(is_train, augmentations=augs, task=task, size_divisibility=32,
                                with_boxes=style == "lsj",
                                filter_empty_instances=name == "coco_instance_lsj")
        for other in (by_keywords, core):
            _same_sample(other(d, rng=np.random.default_rng(5)), ref)


@pytest.fixture()
def custom_mapper_name():
    name = "test_data_custom_mapper"
    yield name
    MAPPER_REGISTRY._obj_map.pop(name, None)  # fvcore registries have no public removal


def test_custom_registered_mapper_is_used_by_the_train_loader(coco, custom_mapper_name):
    built = []

    @register_mapper(custom_mapper_name)
    class TaggingMapper(MaskFormerPanopticDatasetMapper):
        def __init__(self, cfg, is_train=True):
            super().__init__(cfg, is_train)
            built.append(is_train)

        def __call__(self, dataset_dict, rng=None):
            return dict(super().__call__(dataset_dict, rng), tag="custom")

    assert custom_mapper_name in MAPPER_REGISTRY.names()
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME=custom_mapper_name)
    batch = next(iter(build_detection_train_loader(cfg, dataset=_pan_dicts(coco))))
    assert built == [True] and len(batch) == 2
    assert all(s["tag"] == "custom" and len(s["instances"]) > 0 for s in batch)
    with pytest.raises(KeyError, match="already registered"):
        register_mapper(custom_mapper_name)(lambda cfg, is_train=True: None)
    with pytest.raises(KeyError, match="already registered"):
        register_mapper("mask_former_semantic")(lambda cfg, is_train=True: None)


def test_unknown_mapper_name_lists_the_registered_names(coco, custom_mapper_name):
    register_mapper(custom_mapper_name)(lambda cfg, is_train=True: None)
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_semnatic")
    for build in (lambda: build_mapper(cfg, True),
                  lambda: build_detection_train_loader(cfg, dataset=_pan_dicts(coco))):
        with pytest.raises(KeyError) as e:
            build()
        msg = str(e.value)
        assert "'mask_former_semnatic'" in msg and "DATASET_MAPPER_NAME" in msg
        for name, *_ in OFFICIAL_MAPPERS:
            assert f"'{name}'" in msg
        assert f"'{custom_mapper_name}'" in msg
    with pytest.raises(KeyError, match="coco_instance_lsj"):
        MAPPER_REGISTRY.get("nope")


# --------------------------------------------------------------------------- #
# Bad data
# --------------------------------------------------------------------------- #
@pytest.fixture()
def bad_dicts(coco, tmp_path):
    good = _pan_dicts(coco)
    mismatch = dict(good[0], height=SIZES[0][0] + 1)
    missing = dict(good[1], file_name=str(tmp_path / "missing.jpg"))
    corrupt_png = tmp_path / "corrupt.png"
    data = open(good[2]["pan_seg_file_name"], "rb").read()
    corrupt_png.write_bytes(data[: len(data) // 2])  # truncated
    corrupt = dict(good[2], pan_seg_file_name=str(corrupt_png))
    wrong_png = dict(good[0], pan_seg_file_name=good[1]["pan_seg_file_name"])
    return good, {"size_mismatch": mismatch, "missing_file": missing, "corrupt_file": corrupt,
                  "png_mismatch": wrong_png}


def test_mapper_raises_bad_sample_error(bad_dicts):
    _, bad = bad_dicts
    mapper = build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic"), True)
    expect = {"size_mismatch": ("size_mismatch", "file_name"),
              "missing_file": ("missing_file", "file_name"),
              "corrupt_file": ("corrupt_file", "pan_seg_file_name"),
              "png_mismatch": ("size_mismatch", "pan_seg_file_name")}
    for key, d in bad.items():
        with pytest.raises(BadSampleError) as e:
            mapper(d)
        reason, field = expect[key]
        assert e.value.reason == reason and e.value.file == d[field], key
    garbage = dict(bad["missing_file"])
    path = os.path.join(os.path.dirname(garbage["file_name"]), "garbage.jpg")
    open(path, "wb").write(b"not an image at all")
    garbage["file_name"] = path
    with pytest.raises(BadSampleError, match="corrupt_file"):
        mapper(garbage)


def test_loader_skips_bad_samples(bad_dicts, caplog):
    good, bad = bad_dicts
    dataset = good + [bad["size_mismatch"], bad["missing_file"]]  # 2 of 5 bad
    dataset += [dict(g) for g in good] + [bad["corrupt_file"]]  # 3 of 9 bad
    reset_skipped_samples()
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic")
    with caplog.at_level(logging.WARNING, logger="mask2former.data.build"):
        loader = iter(build_detection_train_loader(cfg, dataset=dataset))
        for _ in range(12):
            batch = next(loader)
            assert len(batch) == 2 and all(len(s["instances"]) > 0 for s in batch)
    counts = skipped_samples()
    assert set(counts) == {"size_mismatch", "missing_file", "corrupt_file"}
    assert "missing.jpg" in caplog.text and "corrupt.png" in caplog.text


def test_loader_gives_up_when_most_samples_are_bad(bad_dicts):
    good, bad = bad_dicts
    dataset = [good[0], bad["size_mismatch"], bad["missing_file"], bad["corrupt_file"]]
    reset_skipped_samples()
    loader = iter(build_detection_train_loader(_cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic"),
                                               dataset=dataset))
    with pytest.raises(RuntimeError, match="could not be loaded"):
        for _ in range(20):
            next(loader)


def test_filter_empty_annotations(coco):
    dicts = _pan_dicts(coco)
    dicts[1] = dict(dicts[1], segments_info=[])
    dicts[2] = dict(dicts[2], segments_info=[s for s in dicts[2]["segments_info"] if s["iscrowd"]])
    DatasetCatalog.register("_t_empty", lambda: dicts)
    try:
        assert [d["image_id"] for d in get_detection_dataset_dicts("_t_empty")] == [100]
        assert len(get_detection_dataset_dicts(["_t_empty"], filter_empty=False)) == 3
        cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic")
        cfg.DATASETS.TRAIN = ("_t_empty",)
        batch = next(iter(build_detection_train_loader(cfg)))
        assert {s["image_id"] for s in batch} == {100}
    finally:
        DatasetCatalog.remove("_t_empty")
        MetadataCatalog.remove("_t_empty")


# --------------------------------------------------------------------------- #
# Sampling, determinism, resume
# --------------------------------------------------------------------------- #
def test_training_sampler_determinism_and_sharding():
    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    a = take(TrainingSampler(7, seed=3), 21)
    assert a == take(TrainingSampler(7, seed=3), 21)
    assert a != take(TrainingSampler(7, seed=4), 21)
    assert all(sorted(a[i:i + 7]) == list(range(7)) for i in (0, 7, 14))  # epochs are permutations
    r0 = take(TrainingSampler(7, seed=3, rank=0, world_size=2), 10)
    r1 = take(TrainingSampler(7, seed=3, rank=1, world_size=2), 10)
    assert r0 == a[0:20:2] and r1 == a[1:20:2]


def _fingerprint(batch):
    return [(s["file_name"], (s["width"] > s["height"]), tuple(s["image"].shape),
             int(s["image"].sum()), s["instances"].gt_masks.sum().item()) for s in batch]


@pytest.mark.parametrize("grouping", [False, True])
def test_train_loader_resume_matches_uninterrupted(coco, grouping):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic", INPUT__CROP__ENABLED=True,
               INPUT__CROP__TYPE="relative_range", INPUT__CROP__SIZE=[0.5, 0.5],
               INPUT__COLOR_AUG_SSD=True, INPUT__MIN_SIZE_TRAIN=(30, 60),
               INPUT__MIN_SIZE_TRAIN_SAMPLING="range", DATALOADER__ASPECT_RATIO_GROUPING=grouping)
    dataset = _pan_dicts(coco)
    full_it = iter(build_detection_train_loader(cfg, dataset=dataset))
    full = [_fingerprint(next(full_it)) for _ in range(6)]
    resumed_it = iter(build_detection_train_loader(cfg, dataset=dataset, start_iter=4))
    assert [_fingerprint(next(resumed_it)) for _ in range(2)] == full[4:]
    groups = [{landscape for _, landscape, *_ in b} for b in full]
    if grouping:  # each batch holds one aspect group (of the original image size)
        assert all(len(g) == 1 for g in groups)
    else:  # with 2 landscape + 1 portrait images, some batch mixes them
        assert any(len(g) == 2 for g in groups)
    # a different seed gives different batches
    other = iter(build_detection_train_loader(_cfg(SEED=8), dataset=dataset,
                                              mapper=build_mapper(cfg, True)))
    assert [_fingerprint(next(other)) for _ in range(6)] != full


def test_train_loader_workers_do_not_change_samples(coco):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic", INPUT__COLOR_AUG_SSD=True)
    dataset = _pan_dicts(coco)
    it0 = iter(build_detection_train_loader(cfg, dataset=dataset))
    ref = [_fingerprint(next(it0)) for _ in range(3)]
    cfg.DATALOADER.NUM_WORKERS = 2
    it2 = iter(build_detection_train_loader(cfg, dataset=dataset))
    assert [_fingerprint(next(it2)) for _ in range(3)] == ref


def test_train_loader_foreign_mapper_is_deterministic(coco):
    """A mapper without an ``rng`` argument gets seeded global RNGs (restored afterwards)."""

    def mapper(d):
        return {"file_name": d["file_name"], "r": np.random.rand(), "t": torch.rand(1).item()}

    cfg = _cfg()
    dataset = _pan_dicts(coco)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [next(iter(build_detection_train_loader(cfg, mapper, dataset=dataset))) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    b = list(build_detection_train_loader(cfg, mapper, start_iter=1, dataset=dataset).__iter__().__next__())
    assert a[0] == a[1]  # fresh loaders start at the same place
    full = iter(build_detection_train_loader(cfg, mapper, dataset=dataset))
    next(full)
    assert next(full) == b


def test_random_seed_is_recorded(coco):
    """SEED -1 draws a seed; the loader records the one it uses: SEED <that> gives its samples."""
    def first_batches(seed):
        loader = build_detection_train_loader(_cfg(SEED=seed), mapper=lambda d: d["file_name"],
                                              dataset=_pan_dicts(coco))
        it = iter(loader)
        return loader.seed, [next(it) for _ in range(8)]

    seed, batches = first_batches(-1)
    assert seed >= 0
    assert first_batches(seed) == (seed, batches)
    assert first_batches(seed + 1)[1] != batches


def test_test_loader_shards_in_order(coco):
    cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic")
    dataset = _pan_dicts(coco)
    seen = []
    for rank in range(2):
        loader = build_detection_test_loader(cfg, "unused", dataset=dataset, rank=rank, world_size=2)
        for batch in loader:
            assert len(batch) == 1
            s = batch[0]
            assert min(s["image"].shape[1:]) == 32
            assert (s["height"], s["width"]) == SIZES[s["image_id"] - 100]
            seen.append(s["image_id"])
    assert seen == [100, 101, 102]
