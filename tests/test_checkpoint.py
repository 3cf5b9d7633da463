import collections
import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

from mask2former.checkpoint import (
    CheckpointError,
    LoadResult,
    UnsafeCheckpointError,
    _suffix_match,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tests.conftest import require_shared


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c)


class Net(nn.Module):
    """A `backbone` (ResNet-ish names) plus a `sem_seg_head`, like the real model."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = Block(c)
        self.backbone.res2 = nn.Sequential(Block(c), Block(c))
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.norm = nn.LayerNorm(8)
        self.sem_seg_head.predictor = nn.Linear(c, classes)


def _net(seed):
    torch.manual_seed(seed)
    return Net()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _as_numpy(sd, float_dtype=np.float32):
    out = collections.OrderedDict()
    for k, v in sd.items():
        a = v.detach().numpy()
        out[k] = a.astype(float_dtype) if a.dtype.kind == "f" else a
    out._metadata = collections.OrderedDict({"": {"version": 1}})  # as torch state dicts carry
    return out


def _write_pkl(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- real parity file
def test_read_real_model_zoo_pkl(parity_dir):
    sd, meta = read_checkpoint(require_shared(parity_dir / "tiny_panoptic.pkl"))
    assert len(sd) == 370
    assert "_metadata" not in sd
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
    assert {k.split(".")[0] for k in sd} == {"backbone", "sem_seg_head", "criterion"}
    assert meta["source_format"] == "model_zoo_pkl"
    assert "Mask2Former" in meta["__author__"]
    assert meta["matching_heuristics"] is False


def test_swin_imagenet_names_map_only_to_backbone(parity_dir):
    # The real model has many `*.norm.weight` keys in its head; the Swin classifier's `norm.weight`
    # must not be matched to any of them.
    sd, _ = read_checkpoint(require_shared(parity_dir / "tiny_swin_semantic.pkl"))
    model_keys = list(sd)
    bb = [k[len("backbone."):] for k in model_keys if k.startswith("backbone.")]
    extra = ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    mapping, ambiguous = _suffix_match(model_keys, bb + extra)
    assert mapping == {k: "backbone." + k for k in bb}
    assert not ambiguous


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("wrapped", [True, False])
def test_pth_round_trip(tmp_path, wrapped):
    src, dst = _net(0), _net(1)
    path = tmp_path / "m.pth"
    obj = {"model": src.state_dict(), "iteration": 7, "optimizer": {"state": {}}} if wrapped else src.state_dict()
    save_checkpoint(obj, path)
    res = load_checkpoint(dst, path)
    assert _same(src, dst)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert len(res.loaded_keys) == len(src.state_dict())
    assert res.source_format == ("torch_checkpoint" if wrapped else "torch_state_dict")
    _, meta = read_checkpoint(path)
    if wrapped:
        assert meta["iteration"] == 7 and "optimizer" in meta


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_model_zoo_pkl_round_trip_casts_dtypes(tmp_path, protocol):
    src, dst = _net(0), _net(1)
    arrays = _as_numpy(src.state_dict(), np.float64)
    path = _write_pkl(tmp_path / "m.pkl", {"model": arrays, "__author__": "test"}, protocol)
    res = load_checkpoint(dst, path)
    assert res.source_format == "model_zoo_pkl"
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in dst.state_dict().items():
        ref = src.state_dict()[k]
        assert v.dtype == ref.dtype  # float64 -> float32, int64 num_batches_tracked stays int64
        assert torch.equal(v, ref)  # float32 -> float64 -> float32 is exact


def test_bare_state_dict_pkl(tmp_path):
    src, dst = _net(0), _net(1)
    path = _write_pkl(tmp_path / "bare.pkl", dict(_as_numpy(src.state_dict())))
    res = load_checkpoint(dst, path)
    assert res.source_format == "pkl_state_dict"
    assert _same(src, dst)


def _py2_pickle(values):
    """Bytes as Python 2's cPickle (protocol 2) writes {"model": OrderedDict(w=float32 array)}."""

    def s(b):  # py2 `str` -> SHORT_BINSTRING / BINSTRING
        b = b.encode() if isinstance(b, str) else b
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    dtype = b"cnumpy\ndtype\n" + s("f4") + b"K\x00K\x01\x87R(K\x03" + s("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    raw = np.asarray(values, dtype="<f4").tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\nK\x00\x85" + s("b") + b"\x87R"
        + b"(K\x01K" + bytes([len(values)]) + b"\x85" + dtype + b"\x89" + s(raw) + b"tb"
    )
    od = b"ccollections\nOrderedDict\n]](" + s("w") + array + b"ea\x85R"
    return b"\x80\x02}(" + s("model") + od + s("__author__") + s("py2") + b"u."


def test_python2_pickle(tmp_path):
    path = tmp_path / "py2.pkl"
    path.write_bytes(_py2_pickle([1.5, -2.0, 0.25]))
    sd, meta = read_checkpoint(path)
    assert meta["__author__"] == "py2"
    assert torch.equal(sd["w"], torch.tensor([1.5, -2.0, 0.25]))


def test_module_prefix_stripped(tmp_path):
    src, dst = _net(0), _net(1)
    path = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    load_checkpoint(dst, path)
    assert _same(src, dst)


# --------------------------------------------------------------------------- name matching
def _backbone_only(src):
    sd = {k[len("backbone."):]: v.numpy() for k, v in src.state_dict().items() if k.startswith("backbone.")}
    sd["head.weight"] = np.zeros((10, 4), np.float32)
    sd["head.bias"] = np.zeros((10,), np.float32)
    sd["norm.weight"] = np.ones((16,), np.float32)  # suffix of sem_seg_head.norm.weight, wrong shape
    return sd


@pytest.mark.parametrize("flag", [True, False])
def test_matching_heuristics_backbone(tmp_path, flag, caplog):
    src, dst = _net(0), _net(1)
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("sem_seg_head.")}
    obj = {"model": _backbone_only(src), "__author__": "torchvision"}
    if flag:
        obj["matching_heuristics"] = True
    path = _write_pkl(tmp_path / "R-50.pkl", obj)
    with caplog.at_level(logging.INFO, logger="mask2former.checkpoint"):
        res = load_checkpoint(dst, path)
    bb = [k for k in src.state_dict() if k.startswith("backbone.")]
    assert sorted(res.loaded_keys) == sorted(bb)
    for k in bb:
        assert torch.equal(dst.state_dict()[k], src.state_dict()[k])
    for k, v in head_before.items():
        assert torch.equal(dst.state_dict()[k], v)
    assert sorted(res.unexpected_keys) == ["head.bias", "head.weight", "norm.weight"]
    assert sorted(res.missing_keys) == sorted(head_before)
    assert res.renamed["res2.0.conv1.weight"] == "backbone.res2.0.conv1.weight"
    assert "head.{bias,weight}" in caplog.text and "Unexpected" in caplog.text


def test_ambiguous_suffix_is_reported_not_guessed(tmp_path):
    model = nn.Module()
    model.a, model.b = nn.Module(), nn.Module()
    model.a.conv, model.b.conv = nn.Linear(2, 2), nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "amb.pth"
    torch.save({"conv.weight": torch.ones(2, 2)}, path)
    res = load_checkpoint(model, path)
    assert res.ambiguous == {"conv.weight": ["a.conv.weight", "b.conv.weight"]}
    assert res.loaded_keys == [] and res.unexpected_keys == ["conv.weight"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert "Ambiguous" in str(res)


# --------------------------------------------------------------------------- BN bookkeeping
class _FrozenBN(nn.Module):
    """Stands in for FrozenBatchNorm2d: BN state without num_batches_tracked."""

    def __init__(self, c):
        super().__init__()
        for n in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(n, torch.zeros(c))


def test_num_batches_tracked_is_not_noise(tmp_path):
    bn = nn.Sequential(nn.BatchNorm2d(3))
    path = tmp_path / "bn.pth"
    sd = {k: v for k, v in bn.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    res = load_checkpoint(nn.Sequential(nn.BatchNorm2d(3)), path)
    assert res.missing_keys == [] and res.unexpected_keys == []

    torch.save(bn.state_dict(), path)  # has 0.num_batches_tracked
    res = load_checkpoint(nn.Sequential(_FrozenBN(3)), path)
    assert res.missing_keys == [] and res.unexpected_keys == []


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch(tmp_path, strict):
    src, dst = _net(0), _net(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    sd["sem_seg_head.predictor.weight"] = torch.zeros(5, 4)
    sd["backbone.stem.conv1.weight"] = torch.zeros(4, 4, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    if strict:
        with pytest.raises(CheckpointError) as ei:
            load_checkpoint(dst, path)
        msg = str(ei.value)
        assert str(path) in msg and "nothing was loaded" in msg
        assert "sem_seg_head.predictor.weight: checkpoint (5, 4) vs model (3, 4)" in msg
        assert "backbone.stem.conv1.weight: checkpoint (4, 4, 1, 1) vs model (4, 4, 3, 3)" in msg
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())  # all-or-nothing
    else:
        res = load_checkpoint(dst, path, strict_shapes=False)
        assert len(res.skipped_shapes) == 2
        assert set(res.missing_keys) == {"sem_seg_head.predictor.weight", "backbone.stem.conv1.weight"}
        assert torch.equal(dst.state_dict()["sem_seg_head.predictor.bias"], src.state_dict()["sem_seg_head.predictor.bias"])
        assert torch.equal(dst.state_dict()["backbone.stem.conv1.weight"], before["backbone.stem.conv1.weight"])


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_truncated_file(tmp_path, suffix):
    src = _net(0)
    path = tmp_path / f"cut{suffix}"
    if suffix == ".pkl":
        _write_pkl(path, {"model": _as_numpy(src.state_dict()), "__author__": "x"})
    else:
        torch.save({"model": src.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(_net(1), path)


def test_malicious_pkl_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _write_pkl(tmp_path / "evil.pkl", {"model": {"w": _Evil(marker)}, "__author__": "x"})
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_checkpoint(_net(0), path)
    msg = str(ei.value)
    assert str(path) in msg and "system" in msg and "numpy arrays" in msg
    assert isinstance(ei.value, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pth_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.zeros(1)}, "hook": _Evil(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        _write_pkl(path, obj, protocol=2)  # torch's legacy reader expects protocol 2
    with pytest.raises(UnsafeCheckpointError) as ei:
        read_checkpoint(path)
    assert str(path) in str(ei.value)
    assert not marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pkl"
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_checkpoint(_net(0), path)


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": [1, 2]}, {"a": "not an array"}])
def test_non_dict_content(tmp_path, content):
    path = _write_pkl(tmp_path / "odd.pkl", content)
    with pytest.raises(CheckpointError, match="odd.pkl"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- saving
class _Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("_Unpicklable refuses to be pickled")


def test_save_checkpoint_atomic(tmp_path):
    path = tmp_path / "ckpt" / "model_final.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 1}, path)
    good = path.read_bytes()
    # the pickling error reaches the caller as it is, and the old file stays
    with pytest.raises(pickle.PicklingError, match="refuses to be pickled"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "obj": _Unpicklable()}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_final.pth"]
    save_checkpoint({"model": {"w": torch.full((2,), 3.0)}, "iteration": 2}, path)
    sd, meta = read_checkpoint(path)
    assert meta["iteration"] == 2 and torch.equal(sd["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_final.pth"]


def test_report_is_compact():
    res = LoadResult(
        missing_keys=[f"sem_seg_head.predictor.layers.{i}.{p}" for i in range(50) for p in ("weight", "bias")],
        unexpected_keys=["head.weight", "head.bias"],
        loaded_keys=["backbone.x"],
        source_format="model_zoo_pkl",
        path="/x.pkl",
    )
    text = str(res)
    assert len(text.splitlines()) <= 25
    assert "Missing in checkpoint (model keys left as initialised): 100" in text
    assert "head.{bias,weight}" in text
