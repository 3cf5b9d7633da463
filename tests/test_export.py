"""Export to ONNX and torch.export (mask2former.export): every parity model of ../shared/parity,
exported once per format, runs through ``load_exported`` on every stored input at the input's own
size (one file for all sizes) and gives the eager model's outputs and the official ones, within
the parity tolerances of ../shared/parity/README.md (kMaX-DeepLab: its own section's).

Eager vs exported: the eager output is turned into the parity file's format (``as_reference``)
and checked with the same functions as the official outputs, plus the largest difference of the
full probability map.
"""
import json

import numpy as np
import pytest
import torch

import mask2former as m2f
from mask2former.export import ExportError, export_model, load_exported
from tests import test_kmax_model as kmax
from tests.conftest import require_module
from tests.test_parity import (FOLDERS, MODELS, PROB_TOL, build_parity_model, check_official_outputs, parity_cases,
                               parity_file, run)

ALL_MODELS = MODELS + ["kmax_panoptic"]
FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
FOLDER = dict(FOLDERS, kmax_panoptic="kmax")


def parity_path(parity_dir, name, suffix):
    return parity_dir / FOLDER.get(name, "") / f"tiny_{name}{suffix}"


def parity_cfg(parity_dir, name):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(parity_path(parity_dir, name, ".yaml")))
    return cfg


@pytest.fixture(scope="module")
def exported(parity_dir, tmp_path_factory):
    """(name, format) -> (eager model, ExportedModel, export result); each exported once."""
    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            if fmt == "onnx":
                require_module("onnxruntime", "pip install -e '.[export]'")
            if name == "kmax_panoptic":
                model = m2f.build_model(parity_cfg(parity_dir, name)).eval()
                assert not m2f.load_checkpoint(model, str(parity_path(parity_dir, name, ".pkl"))).missing_keys
            else:
                model = build_parity_model(parity_dir, name)
            path = tmp_path_factory.mktemp("export") / f"{name}{FORMATS[fmt]}"
            result = export_model(model, str(path), fmt)
            cache[name, fmt] = model, load_exported(str(path), parity_cfg(parity_dir, name)), result
        return cache[name, fmt]

    return get


def as_reference(out, seed=0):
    """The eager output ``out`` in the parity files' format (key -> array), for the official checks."""
    ref = {}
    if "sem_seg" in out:
        sem = out["sem_seg"].numpy()
        yx = np.random.default_rng(seed).integers(0, sem.shape[1:], size=(64, 2)).T
        ref.update(sem_mean=sem.mean((1, 2)), sem_yx=yx, sem_samples=sem[:, yx[0], yx[1]],
                   sem_argmax=sem.argmax(0))
    if "panoptic_seg" in out:
        seg, info = out["panoptic_seg"]
        ref.update(panoptic_seg=seg.numpy(), panoptic_info=json.dumps(info))
    if "instances" in out:
        ins = out["instances"]
        ref.update(ins_scores=ins.scores.numpy(), ins_classes=ins.pred_classes.numpy(),
                   ins_masks=ins.pred_masks.numpy().astype(np.uint8))
    if "original_image" in out:
        ref["original_image"] = out["original_image"].numpy()
    return ref


def check_against(name, out, ref, case_key):
    """``out`` against ``ref`` (key -> array, with ``out_hw``) by the checks of the parity tests."""
    if name == "kmax_panoptic":
        kmax.compare(out, lambda key: ref[key])
        return {"semantic", "panoptic", "instance"}
    io = {f"{case_key}__{k}": v for k, v in ref.items()}
    return check_official_outputs(out, _Npz(io), case_key)


class _Npz(dict):
    """A dict that looks like np.load's result to check_official_outputs (``.files`` and indexing)."""

    @property
    def files(self):
        return list(self)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", ALL_MODELS)
def test_exported_outputs_equal_eager_and_official(parity_dir, exported, name, fmt):
    model, exported_model, _ = exported(name, fmt)
    io = np.load(parity_path(parity_dir, name, "_io.npz"))
    cases = parity_cases(io)
    padded_sizes = set()
    checked = set()
    for case in cases:
        image, out_hw = io[f"{case}__image"], io[f"{case}__out_hw"]
        eager = run(model, image, out_hw)
        inp = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
               "height": int(out_hw[0]), "width": int(out_hw[1])}
        out = exported_model([inp])[0]
        assert sorted(out) == sorted(eager)
        ref = as_reference(eager)
        ref["out_hw"] = out_hw
        checked |= check_against(name, out, ref, case)
        if "sem_seg" in out:  # the whole map, not only the sampled pixels
            tol = kmax.PROB_TOL if name == "kmax_panoptic" else PROB_TOL
            assert float((out["sem_seg"] - eager["sem_seg"]).abs().max()) <= tol
        official = {k.split("__", 1)[1]: io[k] for k in io.files if k.startswith(case + "__")}
        check_against(name, out, official, case)
        d = max(model.size_divisibility, 1)
        padded_sizes.add(tuple(-(-s // d) * d for s in image.shape[:2]))
    assert checked
    if name != "kmax_panoptic":  # one file served inputs of several padded sizes (none a multiple itself)
        assert len(padded_sizes) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_batch_runs_through_one_call(parity_dir, exported, fmt):
    """Two images of one padded size go through the exported network together (dynamic batch),
    and an input whose size is no multiple of 32 is padded as the eager model pads it."""
    model, exported_model, _ = exported("panoptic", fmt)
    io = np.load(parity_path(parity_dir, "panoptic", "_io.npz"))
    image = io["rocket_native__image"]
    assert image.shape[0] % 32  # 213 rows: padded to 224
    inputs = [{"image": torch.as_tensor(np.ascontiguousarray(im.transpose(2, 0, 1))).float()}
              for im in (image, image[::-1].copy())]
    calls = []
    runner = exported_model.model.predict_padded

    def counting(batch):
        calls.append(tuple(batch.shape))
        return runner(batch)

    exported_model.model.predict_padded = counting
    try:
        outs = exported_model(inputs)
    finally:
        exported_model.model.predict_padded = runner
    assert calls == [(2, 3, 224, 320)]
    with torch.no_grad():
        eager = model(inputs)
    for a, b in zip(outs, eager):
        assert float((a["sem_seg"] - b["sem_seg"]).abs().max()) <= PROB_TOL


def test_onnx_graph_uses_standard_operators_only(parity_dir, exported):
    onnx = require_module("onnx", "pip install -e '.[export]'")
    _, exported_model, result = exported("panoptic", "onnx")
    graph = onnx.load(result["path"])
    onnx.checker.check_model(graph, full_check=True)
    domains = {n.domain for n in graph.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    ops = {n.op_type for n in graph.graph.node}
    assert "GridSample" in ops  # the deformable attention, decomposed
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, height, width dynamic


def test_torch_program_keeps_the_compiled_operator(exported):
    from tests.conftest import require_compiled_cpu_ops

    require_compiled_cpu_ops()
    _, exported_model, result = exported("panoptic", "torch")
    program = torch.export.load(result["path"])
    # the pixel decoder runs under autocast(enabled=False): its ops sit in a nested graph
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = {str(n.target) for g in graphs for n in g.nodes if n.op == "call_function"}
    assert "mask2former.ms_deform_attn.default" in targets
    assert not any("grid_sampler" in t for t in targets)


@pytest.mark.slow
def test_openvino_runs_the_onnx_file(parity_dir, exported):
    """The same .onnx file on OpenVINO (optional runtime): its metadata is read, float32 kept."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional runtime")
    model, _, result = exported("panoptic", "onnx")
    ov_model = load_exported(result["path"], parity_cfg(parity_dir, "panoptic"), "openvino")
    assert ov_model.metadata["num_classes"] == "133" and ov_model.metadata["divisibility"] == "32"
    io = np.load(parity_path(parity_dir, "panoptic", "_io.npz"))
    image, out_hw = io["rocket_native__image"], io["rocket_native__out_hw"]
    inp = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
           "height": int(out_hw[0]), "width": int(out_hw[1])}
    out = ov_model([inp])[0]
    assert float((out["sem_seg"] - run(model, image, out_hw)["sem_seg"]).abs().max()) <= PROB_TOL
