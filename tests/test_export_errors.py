"""mask2former.export: bad input fails with messages that say what and why, the command line,
metadata checks, and the deformable-attention paths the exports trace (level sizes as pairs,
the forced reference)."""
import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mask2former as m2f
from mask2former.export import ExportError, export_model, input_spec, load_exported
from mask2former.modeling.backbone.backbone import Backbone
from mask2former.ops import (level_shapes_tensor, level_start_tensor, ms_deform_attn, ms_deform_attn_reference,
                             reference_kernels)
from mask2former.utils.registry import BACKBONE_REGISTRY
from tests.conftest import run_python

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(parity_dir, name="panoptic"):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / f"tiny_{name}.yaml"))
    return cfg


class DataDependentBackbone(Backbone):
    """A backbone whose output size depends on pixel values: no static graph can hold it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self._out_features = ["res2", "res3", "res4", "res5"]
        self._out_feature_channels = dict.fromkeys(self._out_features, 8)
        self._out_feature_strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

    @property
    def size_divisibility(self):
        return 32

    def forward(self, x):
        keep = int((x[0, 0] > 0).sum()) % 3 + 1  # reads the data
        out = {}
        for name, s in self._out_feature_strides.items():
            y = torch.nn.functional.avg_pool2d(self.conv(x), s)
            out[name] = y[:, :, :keep] if name == "res5" else y
        return out


@pytest.fixture
def data_dependent_backbone():
    @BACKBONE_REGISTRY.register()
    def build_data_dependent_backbone(cfg, input_shape):
        return DataDependentBackbone()

    yield "build_data_dependent_backbone"
    BACKBONE_REGISTRY._obj_map.pop("build_data_dependent_backbone")  # fvcore registries have no public removal


def test_a_backbone_that_does_not_export_is_named(parity_dir, data_dependent_backbone, tmp_path):
    cfg = tiny_cfg(parity_dir)
    cfg.MODEL.BACKBONE.NAME = data_dependent_backbone
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    model = m2f.build_model(cfg).eval()
    path = tmp_path / "m.pt2"
    with pytest.raises(ExportError) as err:
        export_model(model, str(path), "torch", height=64, width=64, cfg=cfg)
    message = str(err.value)
    assert "the backbone" in message and "'build_data_dependent_backbone'" in message, message
    assert "DataDependentBackbone" in message and "test_export_errors.py" in message, message
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_format_and_size_errors(parity_dir, tmp_path):
    cfg = tiny_cfg(parity_dir)
    model = m2f.build_model(cfg).eval()
    with pytest.raises(ExportError, match="suffix"):
        export_model(model, str(tmp_path / "m.bin"))
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(model, str(tmp_path / "m.onnx"), "tflite")
    with pytest.raises(ExportError, match="largest exported side"):
        input_spec(model, 9000, 64)
    model.size_divisibility = 0
    with pytest.raises(ExportError, match="SIZE_DIVISIBILITY 0 pads nothing"):
        input_spec(model)


def test_kmax_runs_at_one_size(parity_dir):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_dir / "kmax" / "tiny_kmax_panoptic.yaml"))
    model = m2f.build_model(cfg).eval()
    spec = input_spec(model)
    assert tuple(spec.example.shape[-2:]) == (97, 97) and spec.dynamic_shapes == ({0: spec.dynamic_shapes[0][0]},)
    with pytest.raises(ExportError, match=r"one input size, INPUT.IMAGE_SIZE \[97, 97\]"):
        input_spec(model, 128, 128)


def test_missing_onnxruntime_gives_the_install_hint(parity_dir, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    model = m2f.build_model(tiny_cfg(parity_dir)).eval()
    with pytest.raises(ImportError, match=r"pip install 'mask2former\[export\]'"):
        export_model(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ImportError, match=r"pip install 'mask2former\[export\]'"):
        load_exported(str(tmp_path / "m.onnx"), tiny_cfg(parity_dir))


@pytest.mark.slow
def test_command_line_exports_and_the_file_refuses_another_config(parity_dir, tmp_path):
    out = tmp_path / "panoptic.pt2"
    proc = run_python(["-m", "mask2former.export", "--config-file", str(parity_dir / "tiny_panoptic.yaml"),
                       "--format", "torch", "--output", str(out), "--height", "96", "--width", "128",
                       "--opts", "MODEL.WEIGHTS", str(parity_dir / "tiny_panoptic.pkl")], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.exists()
    exported = load_exported(str(out), tiny_cfg(parity_dir))
    assert exported.metadata["num_classes"] == "133"
    with pytest.raises(ExportError, match="num_classes = 133, but the config gives 150"):
        load_exported(str(out), tiny_cfg(parity_dir, "semantic"))
    with pytest.raises(ExportError, match="runtime 'onnxruntime' cannot run"):
        load_exported(str(out), tiny_cfg(parity_dir), "onnxruntime")
    wrong = run_python(["-m", "mask2former.export", "--config-file", str(parity_dir / "tiny_panoptic.yaml"),
                        "--format", "onnx", "--output", str(tmp_path / "x.pt2")])
    assert wrong.returncode == 2 and "writes a .onnx file" in wrong.stderr


def _attention_inputs(dtype=torch.float64, sizes=((6, 5), (3, 3), (2, 1))):
    g = torch.Generator().manual_seed(0)
    n, m, d, lq, p = 2, 2, 4, 7, 3
    s = sum(h * w for h, w in sizes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    locations = torch.rand(n, lq, m, len(sizes), p, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(n, lq, m, len(sizes), p, generator=g, dtype=dtype).softmax(-1)
    return value, list(sizes), locations, weights


def test_level_sizes_as_pairs_equal_the_tensor_form():
    value, sizes, locations, weights = _attention_inputs(torch.float32)
    shapes = level_shapes_tensor(sizes)
    assert shapes.dtype == torch.int64 and shapes.tolist() == [list(s) for s in sizes]
    starts = level_start_tensor(shapes)
    assert starts.tolist() == [0, 30, 39]
    expected = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    assert torch.equal(ms_deform_attn_reference(value, sizes, None, locations, weights), expected)
    with reference_kernels():
        assert torch.equal(ms_deform_attn(value, sizes, None, locations, weights), expected)
    torch.testing.assert_close(ms_deform_attn(value, sizes, None, locations, weights), expected)


def test_reference_kernels_scope_forces_the_reference(monkeypatch):
    import importlib

    module = importlib.import_module("mask2former.ops.ms_deform_attn")
    monkeypatch.setattr(module.state, "compiled_available", lambda device_type: True)
    called = []
    monkeypatch.setattr(torch.ops.mask2former, "ms_deform_attn", lambda *a: called.append(1), raising=False)
    value, sizes, locations, weights = _attention_inputs(torch.float32)
    with reference_kernels():
        ms_deform_attn(value, sizes, None, locations, weights)
    assert not called
    ms_deform_attn(value, sizes, None, locations, weights)
    assert called


def test_pairs_have_gradients():
    value, sizes, locations, weights = _attention_inputs()
    args = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_reference(v, sizes, None, loc, w), args, eps=1e-6, atol=1e-5)


class _Exploit:
    """Unpickling this creates the file ``marker``: the proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_member(src, dst, member, data):
    """Copy the zip ``src`` to ``dst`` with ``member`` holding ``data`` (added when absent)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, data if item.filename == member else zin.read(item.filename))
        if member not in zin.namelist():
            zout.writestr(member, data)


@pytest.mark.slow
def test_a_pt2_archive_that_would_unpickle_code_is_refused(parity_dir, tmp_path):
    import io
    import json
    import pickle
    import zipfile

    cfg = tiny_cfg(parity_dir)
    good = tmp_path / "good.pt2"
    export_model(m2f.build_model(cfg).eval(), str(good), height=64, width=64)
    marker = tmp_path / "code_ran"
    names = zipfile.ZipFile(good).namelist()
    # torch.export.load reads sample inputs with torch.load, retrying unsafely when the safe load fails
    sample = next(n.rsplit("/", 1)[0] for n in names if n.endswith("archive_format")) + "/data/sample_inputs/model.pt"
    weights = next(n for n in names if n.endswith("weights_config.json"))
    buf = io.BytesIO()
    torch.save({"x": _Exploit(str(marker))}, buf)
    bad_sample = tmp_path / "bad_sample.pt2"
    _rewrite_member(good, bad_sample, sample, buf.getvalue())
    with pytest.raises(ExportError, match=f"member {sample} is not plain tensors"):
        load_exported(str(bad_sample), cfg)
    config = json.loads(zipfile.ZipFile(good).read(weights))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    bad_weights = tmp_path / "bad_weights.pt2"
    _rewrite_member(good, bad_weights, weights, json.dumps(config).encode())
    with pytest.raises(ExportError, match="as pickles, which could run code"):
        load_exported(str(bad_weights), cfg)
    not_zip = tmp_path / "x.pt2"
    not_zip.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(ExportError, match="is not a .pt2 archive"):
        load_exported(str(not_zip), cfg)
    assert not marker.exists()
    assert load_exported(str(good), cfg).metadata["num_classes"] == "133"


@pytest.mark.slow
def test_without_compiled_ops_the_pt2_traces_the_reference_and_a_program_with_the_op_says_why(parity_dir, tmp_path):
    """Under M2F_OPS=reference the .pt2 holds the grid_sample reference and runs; a program that
    calls the compiled operator is refused with the reason, not torch's deserialisation error."""
    from tests.conftest import require_compiled_cpu_ops

    require_compiled_cpu_ops()
    with_op = tmp_path / "with_op.pt2"
    export_model(m2f.build_model(tiny_cfg(parity_dir)).eval(), str(with_op), height=64, width=64)
    script = f"""
import torch, mask2former as m2f
from mask2former.export import ExportError, export_model, load_exported
cfg = m2f.get_cfg(); cfg.merge_from_file({str(parity_dir / 'tiny_panoptic.yaml')!r})
export_model(m2f.build_model(cfg).eval(), {str(tmp_path / 'ref.pt2')!r}, height=64, width=64)
program = torch.export.load({str(tmp_path / 'ref.pt2')!r})
targets = {{str(n.target) for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
           for n in m.graph.nodes}}
assert not any('mask2former' in t for t in targets), targets
out = load_exported({str(tmp_path / 'ref.pt2')!r}, cfg)([{{'image': torch.rand(3, 75, 109) * 255}}])[0]
assert tuple(out['sem_seg'].shape) == (133, 75, 109)
try:
    load_exported({str(with_op)!r}, cfg)
except ExportError as exc:
    print('refused:', exc)
"""
    proc = run_python(["-c", script], timeout=600, M2F_OPS="reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout and "calls the compiled mask2former ops" in proc.stdout, proc.stdout
    assert "M2F_OPS=reference" in proc.stdout
