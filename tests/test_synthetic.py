"""The embedded synthetic dataset: layout, consistency between its three annotation formats,
determinism."""
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mask2former.data.datasets import synthetic


def _generate(tmp_path, name="d"):
    return synthetic.ensure_synthetic_dataset(str(tmp_path / name), splits={"train": 6, "val": 3})


def test_layout_and_formats_agree(tmp_path):
    root = _generate(tmp_path)
    contiguous = synthetic.metadata()["stuff_dataset_id_to_contiguous_id"]
    for split, count in (("train", 6), ("val", 3)):
        p = synthetic.split_paths(root, split)
        pan = json.load(open(p["panoptic_json"]))
        ins = json.load(open(p["instances_json"]))
        assert len(pan["images"]) == len(pan["annotations"]) == count
        ins_by_image = {}
        for a in ins["annotations"]:
            ins_by_image.setdefault(a["image_id"], []).append(a)
        for img, ann in zip(pan["images"], pan["annotations"]):
            image = np.array(Image.open(os.path.join(p["image_root"], img["file_name"])))
            assert image.shape == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3) and image.dtype == np.uint8
            rgb = np.array(Image.open(os.path.join(p["panoptic_root"], ann["file_name"]))).astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            sem = np.array(Image.open(os.path.join(p["sem_seg_root"], ann["file_name"])))
            assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
            things = 0
            for s in ann["segments_info"]:
                m = ids == s["id"]
                assert s["area"] == int(m.sum()) > 0
                assert (sem[m] == contiguous[s["category_id"]]).all()
                things += s["category_id"] <= 3
            assert (sem[ids == 0] == 255).all()
            assert 1 <= things <= 6
            rles = ins_by_image.get(img["id"], [])
            assert len(rles) == things
            for a in rles:
                m = mask_util.decode(a["segmentation"]).astype(bool)
                seg_ids = np.unique(ids[m])
                assert len(seg_ids) == 1 and seg_ids[0] // 1000 == a["category_id"]


def test_generation_is_deterministic_and_idempotent(tmp_path):
    a, b = _generate(tmp_path, "a"), _generate(tmp_path, "b")
    f = "train2017/000003.png"
    assert np.array_equal(np.array(Image.open(os.path.join(a, f))), np.array(Image.open(os.path.join(b, f))))
    stamp = os.path.getmtime(os.path.join(a, f))
    assert _generate(tmp_path, "a") == a and os.path.getmtime(os.path.join(a, f)) == stamp
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".synthetic-")]
