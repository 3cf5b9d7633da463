"""The model built from our config at each official path has exactly the official state-dict
keys and shapes (../shared/parity/manifest_*.json), so model-zoo checkpoints load cleanly."""
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

import mask2former as m2f
from tests.conftest import PARITY_MANIFESTS, REPO


def build_from_official_path(config_path, device="meta", overrides=None):
    """The model of our config at ``config_path``, then ``overrides`` ({key: value}, a manifest's
    "overrides": the options of the released run script) merged."""
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(REPO / config_path))
    cfg.merge_from_list([x for kv in (overrides or {}).items() for x in kv])
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    if device == "meta":
        with torch.device("meta"):
            return m2f.build_model(cfg)
    return m2f.build_model(cfg)


def test_every_manifest_is_listed(parity_dir):
    assert sorted(p.stem[len("manifest_"):] for p in parity_dir.glob("manifest_*.json")) == sorted(PARITY_MANIFESTS)


def check_manifest(spec):
    """The model of our config at a manifest's path has exactly its keys and shapes."""
    model = build_from_official_path(spec["config"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = spec["keys"]
    assert sorted(set(ours) - set(theirs)) == [], "keys the official model does not have"
    assert sorted(set(theirs) - set(ours)) == [], "official keys our model lacks"
    wrong = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != list(theirs[k])}
    assert wrong == {}


@pytest.mark.parametrize("name", PARITY_MANIFESTS)
def test_state_dict_matches_manifest(parity_dir, name):
    check_manifest(json.loads((parity_dir / f"manifest_{name}.json").read_text()))


def test_checkpoint_with_manifest_keys_loads_cleanly(parity_dir, tmp_path):
    spec = json.loads((parity_dir / "manifest_coco_panoptic_R50.json").read_text())
    rng = np.random.default_rng(0)
    weights = OrderedDict(
        (k, rng.standard_normal(shape).astype(np.float32) if shape else np.array(0, dtype=np.int64))
        for k, shape in spec["keys"].items()
    )
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    model = build_from_official_path(spec["config"], device="cpu")
    result = m2f.load_checkpoint(model, str(path))
    assert result.missing_keys == [] and result.unexpected_keys == []
    sd = model.state_dict()
    key = "sem_seg_head.predictor.class_embed.weight"
    assert torch.equal(sd[key], torch.from_numpy(weights[key]))
