"""Bad input gets a clear error naming what was wrong (issue: core, acceptance 3)."""
import os
import pickle

import numpy as np
import pytest
import torch

import mask2former as m2f
from mask2former.checkpoint import CheckpointError, UnsafeCheckpointError


@pytest.fixture(scope="module")
def tiny(parity_dir):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / "tiny_semantic.yaml"))
    return cfg, m2f.build_model(cfg).eval()


def test_unknown_config_key_names_key_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  MASK_FORMER:\n    DEC_LAYER: 4\n")
    with pytest.raises(KeyError) as err:
        m2f.get_cfg().merge_from_file(str(path))
    msg = str(err.value)
    assert "MODEL.MASK_FORMER.DEC_LAYER" in msg and "MODEL.MASK_FORMER.DEC_LAYERS" in msg and "bad.yaml" in msg


def test_unknown_key_in_override_list():
    with pytest.raises(KeyError, match="SOLVER.BASE_LRR.*SOLVER.BASE_LR"):
        m2f.get_cfg().merge_from_list(["SOLVER.BASE_LRR", "0.1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        m2f.get_cfg().merge_from_file(str(tmp_path / "nope.yaml"))


def test_missing_base_file_names_includer(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: missing-base.yaml\n")
    with pytest.raises(FileNotFoundError) as err:
        m2f.get_cfg().merge_from_file(str(child))
    assert "missing-base.yaml" in str(err.value) and "child.yaml" in str(err.value)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_with_wrong_shapes_is_refused_and_model_untouched(tiny, parity_dir, tmp_path):
    _, model = tiny
    with open(parity_dir / "tiny_semantic.pkl", "rb") as f:
        ckpt = pickle.load(f, encoding="latin1")
    ckpt["model"]["sem_seg_head.predictor.class_embed.weight"] = np.zeros((7, 3), np.float32)
    path = tmp_path / "wrong.pkl"
    with open(path, "wb") as f:
        pickle.dump(ckpt, f)
    before = _state(model)
    with pytest.raises(CheckpointError) as err:
        m2f.load_checkpoint(model, str(path))
    assert "sem_seg_head.predictor.class_embed.weight" in str(err.value) and "wrong.pkl" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_checkpoint(tiny, parity_dir, tmp_path):
    _, model = tiny
    data = (parity_dir / "tiny_semantic.pkl").read_bytes()
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pkl"):
        m2f.load_checkpoint(model, str(path))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_pickle_that_runs_code_is_refused(tiny, tmp_path, suffix):
    _, model = tiny
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": {"x": _Evil(marker)}}, f)
    else:
        torch.save({"model": {"x": _Evil(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"evil{suffix}"):
        m2f.load_checkpoint(model, str(path))
    assert not marker.exists()


def test_missing_weights_file_when_required(parity_dir):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / "tiny_semantic.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "/nonexistent/model_final.pkl"])
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS.*model_final.pkl"):
        m2f.build_model(cfg, load_weights=True)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (torch.zeros(4, 32, 32), ValueError, r"shape \(3, H, W\)"),
        (torch.zeros(32, 32, 3), ValueError, r"CHW, not HWC"),
        (torch.zeros(32, 32), ValueError, r"shape \(3, H, W\)"),
        (torch.zeros(3, 32, 32, dtype=torch.int64), TypeError, "float or uint8"),
        (torch.zeros(3, 32, 32, dtype=torch.bool), TypeError, "float or uint8"),
        (np.zeros((3, 32, 32), np.float32), TypeError, "torch.Tensor"),
    ],
)
def test_bad_image_tensor(tiny, image, error, match):
    _, model = tiny
    with pytest.raises(error, match=match):
        model([{"image": image}])


def test_bad_batched_inputs(tiny):
    _, model = tiny
    with pytest.raises(TypeError, match="list of dicts"):
        model({"image": torch.zeros(3, 8, 8)})
    with pytest.raises(TypeError, match="'image'"):
        model([{"img": torch.zeros(3, 8, 8)}])
