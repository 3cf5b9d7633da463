"""Solver (optimizer groups, LR schedules, clipping) and Trainer (checkpoints, resume, AMP, NaN
handling, logging, evaluation, hooks and their state, CLI) and the atomic writer on toy models;
no data pipeline needed."""
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import time
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mask2former
from mask2former.checkpoint import load_checkpoint, read_checkpoint
from mask2former.engine import HookBase, Trainer
from mask2former.engine import trainer as trainer_mod
from mask2former.utils.file_io import atomic_write, remove_stale_temp_files
from mask2former.utils.rng import get_rng_states, preserve_rng_states, set_rng_states
from mask2former.solver import (
    GradientClipper,
    build_gradient_clipper,
    build_lr_scheduler,
    build_optimizer,
    get_optimizer_param_groups,
)
from tests.conftest import require_module

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- toy pieces
class ToyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.ln = nn.LayerNorm(16)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3))
        self.absolute_pos_embed = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        x = self.fc(x) + self.absolute_pos_embed + self.relative_position_bias_table.sum()
        return self.ln(torch.relu(self.norm(x)))


class ToyNet(nn.Module):
    """Train mode: list of {"x", "y"[, "bad"]} samples -> {"loss_a", "loss_b"}; a sample's "bad"
    value (NaN, inf, -inf) is added to loss_a. Uses dropout so that resuming must restore the
    torch RNG."""

    def __init__(self):
        super().__init__()
        self.backbone = ToyBackbone()
        self.query_feat = nn.Embedding(4, 16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.seen_dtypes = []

    def forward(self, batch):
        x = torch.stack([s["x"] for s in batch])
        h = self.drop(self.backbone(x)) + self.query_feat.weight.mean(0)
        out = self.head(h)
        self.seen_dtypes.append(out.dtype)
        if not self.training:
            return [{"pred": o} for o in out]
        y = torch.stack([s["y"] for s in batch])
        loss_a = ((out.float() - y) ** 2).mean()
        for s in batch:
            if "bad" in s:
                loss_a = loss_a + s["bad"]
        return {"loss_a": loss_a, "loss_b": 0.1 * h.float().abs().mean()}


class Crash(RuntimeError):
    pass


def toy_loader(crash_at=None, nan_at=None, batch=4, bad=float("nan")):
    """A deterministic infinite loader factory: batch i depends only on i (skip-ahead by start_iter);
    batch ``nan_at`` makes loss_a ``bad``."""

    def build(cfg, start_iter):
        def gen():
            for i in itertools.count(start_iter):
                if crash_at is not None and i == crash_at:
                    raise Crash(f"simulated crash before iteration {i}")
                g = torch.Generator().manual_seed(1000 + i)
                samples = [{"x": torch.randn(8, generator=g), "y": torch.randn(2, generator=g)}
                           for _ in range(batch)]
                if nan_at is not None and i == nan_at:
                    samples[0]["bad"] = bad
                yield samples

        return gen()

    return build


def toy_cfg(out_dir, **solver):
    cfg = mask2former.get_cfg()
    cfg.OUTPUT_DIR = str(out_dir)
    cfg.SEED = 7
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TEST = ()
    cfg.TEST.EVAL_PERIOD = 0
    s = cfg.SOLVER
    s.OPTIMIZER = "ADAMW"
    s.BASE_LR = 0.01
    s.WEIGHT_DECAY = 0.05
    s.MAX_ITER = 20
    s.CHECKPOINT_PERIOD = 5
    s.LR_SCHEDULER_NAME = "WarmupPolyLR"
    s.WARMUP_ITERS = 4
    s.WARMUP_FACTOR = 0.1
    s.CLIP_GRADIENTS.ENABLED = True
    s.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    s.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    s.AMP.ENABLED = False
    for k, v in solver.items():
        setattr(s, k, v)
    return cfg


def make_trainer(cfg, loader=None, cls=Trainer, **kw):
    return cls(cfg, build_model=lambda c: ToyNet(), build_train_loader=loader or toy_loader(),
               log_period=kw.pop("log_period", 5), tensorboard=kw.pop("tensorboard", False), progress_bar=False,
               **kw)


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    log = logging.getLogger("mask2former")
    for h in list(log.handlers):
        if getattr(h, "_mask2former_handler", False):
            log.removeHandler(h)
            h.close()
    log.propagate = True
    log.setLevel(logging.NOTSET)


# ----------------------------------------------------------------------------- optimizer groups
def _group_of(optimizer):
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            assert p not in out, "parameter in two groups"
            out[p] = (g["lr"], g["weight_decay"])
    return out


def test_param_groups_backbone_norm_embed_and_no_duplicates(tmp_path):
    cfg = toy_cfg(tmp_path)
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.001
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.002
    model = ToyNet()
    model.tied = nn.Linear(16, 16)
    model.tied2 = nn.Linear(16, 16)
    model.tied2.weight = model.tied.weight  # shared: must appear once
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    g = _group_of(opt)
    b = model.backbone
    assert g[b.fc.weight] == (0.1, 0.05) and g[b.fc.bias] == (0.1, 0.05)
    assert g[b.norm.weight] == (0.1, 0.001) and g[b.ln.bias] == (0.1, 0.001)
    assert g[b.relative_position_bias_table] == (0.1, 0.0)
    assert g[b.absolute_pos_embed] == (0.1, 0.0)
    assert g[model.query_feat.weight] == (1.0, 0.002)
    assert g[model.head.weight] == (1.0, 0.05)
    assert model.frozen.weight not in g and model.frozen.bias not in g
    trainable = {p for p in model.parameters() if p.requires_grad}
    assert set(g) == trainable
    assert sum(len(grp["params"]) for grp in opt.param_groups) == len(trainable)
    # groups are merged by settings
    assert len(opt.param_groups) == len({v for v in g.values()})
    # without norm/embed settings those layers use the plain weight decay
    groups = get_optimizer_param_groups(model, base_lr=1.0, weight_decay=0.3)
    assert sorted((grp["lr"], grp["weight_decay"], len(grp["params"])) for grp in groups) == [
        (1.0, 0.0, 2), (1.0, 0.3, len(trainable) - 2)]


def test_param_groups_bias_options_and_sgd(tmp_path):
    cfg = toy_cfg(tmp_path, OPTIMIZER="SGD", BASE_LR=1.0, MOMENTUM=0.8, NESTEROV=True,
                  BIAS_LR_FACTOR=2.0, WEIGHT_DECAY_BIAS=0.0, BACKBONE_MULTIPLIER=0.5)
    model = ToyNet()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] is True
    g = _group_of(opt)
    assert g[model.head.bias] == (2.0, 0.0)
    assert g[model.backbone.fc.bias] == (1.0, 0.0)  # 1.0 * 0.5 (backbone) * 2 (bias)
    assert g[model.head.weight] == (1.0, cfg.SOLVER.WEIGHT_DECAY)
    with pytest.raises(ValueError, match="OPTIMIZER"):
        cfg.SOLVER.OPTIMIZER = "LAMB"
        build_optimizer(cfg, model)


def test_param_groups_real_model():
    cfg = mask2former.get_cfg()
    cfg.merge_from_file(str(REPO / "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = mask2former.build_model(cfg, load_weights=False)
    opt = build_optimizer(cfg, model)
    g = _group_of(opt)
    names = {p: n for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(g) == len(trainable)
    base = cfg.SOLVER.BASE_LR
    for p, (lr, wd) in g.items():
        n = names[p]
        assert math.isclose(lr, base * (cfg.SOLVER.BACKBONE_MULTIPLIER if n.startswith("backbone.") else 1.0))
        if n.endswith(("query_feat.weight", "query_embed.weight")):
            assert wd == cfg.SOLVER.WEIGHT_DECAY_EMBED
    assert any(n.endswith("query_feat.weight") for n in names.values())


def test_bare_detectron2_solver_gets_the_official_maskformer2_defaults(tmp_path):
    """Without add_maskformer2_config's SOLVER keys the optimizer uses their official values
    (Mask2Former's config.py: ADAMW, BACKBONE_MULTIPLIER 0.1, WEIGHT_DECAY_EMBED 0.0)."""
    cfg = toy_cfg(tmp_path, BASE_LR=1.0, WEIGHT_DECAY=0.05)
    for key in ("OPTIMIZER", "BACKBONE_MULTIPLIER", "WEIGHT_DECAY_EMBED"):
        cfg.SOLVER.pop(key)
    model = ToyNet()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    g = _group_of(opt)
    assert g[model.backbone.fc.weight] == (0.1, 0.05)
    assert g[model.query_feat.weight] == (1.0, 0.0)
    assert g[model.head.weight] == (1.0, 0.05)


# ----------------------------------------------------------------------------- LR schedules
def _lrs(cfg, n, base=1.0):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt, sched


def _linear_warmup(i, iters, factor):
    if i >= iters:
        return 1.0
    a = i / iters
    return factor * (1 - a) + a


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_warmup_poly_lr(tmp_path, method):
    cfg = toy_cfg(tmp_path, LR_SCHEDULER_NAME="WarmupPolyLR", MAX_ITER=100, WARMUP_ITERS=10,
                  WARMUP_FACTOR=0.01, WARMUP_METHOD=method, POLY_LR_POWER=0.9)
    lrs, _, _ = _lrs(cfg, 101, base=0.1)
    for i in [0, 1, 5, 9, 10, 11, 50, 99, 100]:
        wf = _linear_warmup(i, 10, 0.01) if method == "linear" else (0.01 if i < 10 else 1.0)
        assert lrs[i] == pytest.approx(0.1 * wf * (1 - i / 100) ** 0.9, rel=1e-12, abs=1e-15), i


def test_warmup_poly_lr_constant_ending(tmp_path):
    cfg = toy_cfg(tmp_path, LR_SCHEDULER_NAME="WarmupPolyLR", MAX_ITER=100, WARMUP_ITERS=10,
                  WARMUP_FACTOR=0.01, POLY_LR_POWER=0.9, POLY_LR_CONSTANT_ENDING=0.2)
    lrs, _, _ = _lrs(cfg, 100, base=0.1)
    for i in [0, 5, 10, 50, 80, 90, 95, 99]:
        poly = (1 - i / 100) ** 0.9
        if i >= 10 and poly < 0.2:
            expected = 0.1 * 0.2
        else:
            expected = 0.1 * _linear_warmup(i, 10, 0.01) * poly
        assert lrs[i] == pytest.approx(expected, rel=1e-12), i
    assert lrs[99] == pytest.approx(0.02)


def test_warmup_multistep_and_cosine_lr(tmp_path):
    cfg = toy_cfg(tmp_path, LR_SCHEDULER_NAME="WarmupMultiStepLR", MAX_ITER=100, STEPS=(30, 60, 200),
                  GAMMA=0.1, WARMUP_ITERS=10, WARMUP_FACTOR=0.001)
    lrs, _, _ = _lrs(cfg, 100, base=0.02)
    for i in [0, 3, 9, 10, 29, 30, 59, 60, 99]:
        expected = 0.02 * _linear_warmup(i, 10, 0.001) * 0.1 ** bisect_right([30, 60], i)
        assert lrs[i] == pytest.approx(expected, rel=1e-9), i
    cfg = toy_cfg(tmp_path, LR_SCHEDULER_NAME="WarmupCosineLR", MAX_ITER=100, WARMUP_ITERS=0)
    lrs, _, _ = _lrs(cfg, 100, base=0.5)
    for i in [0, 25, 50, 99]:
        assert lrs[i] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * i / 100)), rel=1e-9)
    with pytest.raises(ValueError, match="LR_SCHEDULER_NAME"):
        cfg.SOLVER.LR_SCHEDULER_NAME = "Nope"
        _lrs(cfg, 1)


def test_instant_drop_sets_the_steps(tmp_path):
    """MP-Former's SOLVER.INSTANT_DROP: the multi-step schedule drops at DROP_EP and DROP_EP + 15000,
    whatever SOLVER.STEPS says."""
    cfg = toy_cfg(tmp_path, LR_SCHEDULER_NAME="WarmupMultiStepLR", MAX_ITER=100, STEPS=(30, 60), GAMMA=0.1,
                  WARMUP_ITERS=0, INSTANT_DROP=True, DROP_EP=20)
    lrs, _, _ = _lrs(cfg, 100, base=1.0)
    assert lrs[19] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1) and lrs[99] == pytest.approx(0.1)
    cfg.SOLVER.INSTANT_DROP = False
    lrs, _, _ = _lrs(cfg, 100, base=1.0)
    assert lrs[29] == pytest.approx(1.0) and lrs[30] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01)


def test_scheduler_keeps_group_ratios_and_resumes(tmp_path):
    cfg = toy_cfg(tmp_path, BASE_LR=1.0, BACKBONE_MULTIPLIER=0.1, MAX_ITER=50, WARMUP_ITERS=5)
    model = ToyNet()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    for _ in range(17):
        opt.step()
        sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert len(lrs) == 2 and lrs[0] == pytest.approx(0.1 * lrs[1])
    state_o, state_s = opt.state_dict(), sched.state_dict()
    model2 = ToyNet()
    opt2 = build_optimizer(cfg, model2)
    sched2 = build_lr_scheduler(cfg, opt2)
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    for _ in range(5):
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


# ----------------------------------------------------------------------------- clipping
def _with_grads(scale):
    model = ToyNet()
    for i, p in enumerate(model.parameters()):
        if p.requires_grad:
            p.grad = torch.randn_like(p) * scale * (i + 1)
    return model


def test_gradient_clipping(tmp_path):
    torch.manual_seed(0)
    cfg = toy_cfg(tmp_path)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    clipper = build_gradient_clipper(cfg)
    assert clipper.clip_type == "full_model"
    model = _with_grads(10.0)
    opt = build_optimizer(cfg, model)
    grads = [p.grad for g in opt.param_groups for p in g["params"]]
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
    returned = clipper(opt)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
    assert float(returned) == pytest.approx(float(before), rel=1e-5)
    assert float(after) <= 0.5 + 1e-5 and float(after) == pytest.approx(0.5, rel=1e-4)

    model = _with_grads(10.0)
    opt = build_optimizer(cfg, model)
    GradientClipper("norm", 0.5)(opt)
    for p in model.parameters():
        if p.grad is not None:
            assert float(p.grad.norm()) <= 0.5 + 1e-5
    GradientClipper("value", 0.01)(opt)
    assert all(float(p.grad.abs().max()) <= 0.01 for p in model.parameters() if p.grad is not None)

    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert build_gradient_clipper(cfg) is None
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.0
    assert build_gradient_clipper(cfg) is None
    with pytest.raises(ValueError, match="CLIP_TYPE"):
        GradientClipper("bogus", 1.0)


# ----------------------------------------------------------------------------- RNG helpers
def test_rng_state_roundtrip_survives_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = get_rng_states()
    path = tmp_path / "rng.pth"
    torch.save({"rng": states}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with preserve_rng_states():
        torch.rand(5)
        random.random()
    set_rng_states(states)
    a = torch.rand(1).item()
    set_rng_states(states)
    with preserve_rng_states():
        torch.rand(3)
    assert torch.rand(1).item() == a


# ----------------------------------------------------------------------------- trainer
def test_checkpoint_names_and_contents(tmp_path):
    cfg = toy_cfg(tmp_path, MAX_ITER=10, CHECKPOINT_PERIOD=4)
    trainer = make_trainer(cfg)
    trainer.train()
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth"))
    assert files == ["model_0000003.pth", "model_0000007.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert (tmp_path / "config.yaml").is_file()
    state, meta = read_checkpoint(tmp_path / "model_final.pth")
    assert meta["iteration"] == 9 and meta["world_size"] == 1
    assert {"optimizer", "scheduler", "rng_states"} <= set(meta)
    assert meta["scheduler"]["last_epoch"] == 10
    assert set(meta["rng_states"][0]) >= {"python", "numpy", "torch"}
    _, meta3 = read_checkpoint(tmp_path / "model_0000003.pth")
    assert meta3["iteration"] == 3
    model = ToyNet()
    res = load_checkpoint(model, tmp_path / "model_final.pth")
    assert not res.missing_keys and not res.unexpected_keys
    assert max_abs_diff(model.state_dict(), trainer.model_without_ddp.state_dict()) == 0


def test_resume_exactness(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    t = make_trainer(toy_cfg(straight))
    t.train()

    # first attempt dies at iteration 12, after the checkpoint of iteration 9
    t1 = make_trainer(toy_cfg(resumed), loader=toy_loader(crash_at=12))
    with pytest.raises(Crash):
        t1.train()
    assert (resumed / "last_checkpoint").read_text().strip() == "model_0000009.pth"
    assert not (resumed / "model_final.pth").exists()

    t2 = make_trainer(toy_cfg(resumed))
    t2.resume_or_load(resume=True)
    assert t2.start_iter == 10
    t2.train()

    a, _ = read_checkpoint(straight / "model_final.pth")
    b, meta_b = read_checkpoint(resumed / "model_final.pth")
    assert max_abs_diff(a, b) <= 1e-6
    _, meta_a = read_checkpoint(straight / "model_final.pth")
    assert meta_a["scheduler"] == meta_b["scheduler"]
    for x, y in zip(meta_a["optimizer"]["state"].values(), meta_b["optimizer"]["state"].values()):
        assert torch.allclose(x["exp_avg"], y["exp_avg"], atol=1e-6)

    # metrics.json: every line parses; the resumed file has no duplicate or torn lines
    for d in (straight, resumed):
        rows = read_metrics(d)
        assert [r["iteration"] for r in rows] == [4, 9, 14, 19]
        assert all(math.isfinite(r["total_loss"]) and "lr" in r and "loss_a" in r for r in rows)
    assert read_metrics(straight)[-1]["lr"] == pytest.approx(read_metrics(resumed)[-1]["lr"])

    # resuming a finished run does nothing more
    t3 = make_trainer(toy_cfg(resumed))
    t3.resume_or_load(resume=True)
    assert t3.start_iter == 20
    t3.train()
    c, _ = read_checkpoint(resumed / "model_final.pth")
    assert max_abs_diff(b, c) == 0


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    t = make_trainer(toy_cfg(tmp_path, MAX_ITER=3))
    t.resume_or_load(resume=True)
    assert t.start_iter == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, bad):
    t = make_trainer(toy_cfg(tmp_path), loader=toy_loader(nan_at=7, bad=bad))
    with pytest.raises(FloatingPointError) as e:
        t.train()
    msg = str(e.value)
    assert "iteration 7" in msg and "loss_a" in msg and "loss_b" in msg and "model_0000004.pth" in msg
    assert "non-finite loss_a " in msg and f"loss_a={bad}" in msg
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000004.pth"
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000004.pth"]
    state, meta = read_checkpoint(tmp_path / "model_0000004.pth")
    assert meta["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_negative_seed_is_drawn_logged_and_checkpointed(tmp_path):
    """SEED -1: the drawn seed is stated in log.txt, is the one the checkpoint records, and is
    what a resume continues with (the resumed trainer draws its own and then takes the saved one)."""
    import re

    from mask2former.engine.defaults import setup_logger

    setup_logger(str(tmp_path))
    cfg = toy_cfg(tmp_path, MAX_ITER=2, CHECKPOINT_PERIOD=0)
    cfg.SEED = -1
    t = make_trainer(cfg)
    t.train()
    log = (tmp_path / "log.txt").read_text()
    drawn = [int(m) for m in re.findall(r"Using a randomly drawn seed (\d+) \(set SEED \1 to repeat this run\)", log)]
    assert len(drawn) == 1 and f"Rank 0 of 1, seed {drawn[0]}\n" in log
    _, meta = read_checkpoint(tmp_path / "model_final.pth")
    assert meta["seed"] == drawn[0] == t.seed
    t2 = make_trainer(cfg)
    assert t2.seed != drawn[0]  # a fresh draw (2**-31 chance of a clash)...
    t2.resume_or_load(resume=True)
    assert t2.seed == drawn[0]  # ...replaced by the run's seed


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            f.write(b"PK\x03\x04 partial")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    t = make_trainer(toy_cfg(tmp_path))
    with pytest.raises(OSError, match="No space"):
        t.train()
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000004.pth"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.yaml", "last_checkpoint", "metrics.json", "model_0000004.pth"])
    t2 = make_trainer(toy_cfg(tmp_path))
    t2.resume_or_load(resume=True)
    assert t2.start_iter == 5


def test_amp_bf16_on_cpu(tmp_path):
    cfg = toy_cfg(tmp_path, MAX_ITER=3)
    cfg.SOLVER.AMP.ENABLED = True
    t = make_trainer(cfg)
    before = {k: v.clone() for k, v in t.model_without_ddp.state_dict().items()}
    t.train()
    model = t.model_without_ddp
    assert t.scaler is None and t.amp_dtype == torch.bfloat16
    assert model.seen_dtypes and all(d == torch.bfloat16 for d in model.seen_dtypes)
    assert max_abs_diff(before, model.state_dict()) > 0
    rows = read_metrics(tmp_path)
    assert rows and all(math.isfinite(r["total_loss"]) for r in rows)


def _crash_and_resume(out_dir, crash_at, amp=False, scaler=None, **kw):
    """Train toy_cfg(out_dir) until the loader crashes before ``crash_at``, then resume in a fresh
    trainer to the end; ``scaler()`` (if given) makes the GradScaler put into both trainers."""
    cfg = toy_cfg(out_dir)
    cfg.SOLVER.AMP.ENABLED = amp
    t1 = make_trainer(cfg, loader=toy_loader(crash_at=crash_at), **kw)
    if scaler is not None:
        t1.scaler = scaler()
    with pytest.raises(Crash):
        t1.train()
    t2 = make_trainer(cfg, **kw)
    if scaler is not None:
        t2.scaler = scaler()
    t2.resume_or_load(resume=True)
    return t1, t2


def test_amp_bf16_resume_is_bitwise_exact(tmp_path):
    """SOLVER.AMP on CPU (bf16 autocast): interrupted after a checkpoint and resumed, the run ends
    with bitwise the weights and optimizer state of the uninterrupted AMP run, which differ from
    the fp32 run's (so the resumed half did run under autocast)."""
    cfg = toy_cfg(tmp_path / "straight")
    cfg.SOLVER.AMP.ENABLED = True
    make_trainer(cfg).train()
    make_trainer(toy_cfg(tmp_path / "fp32")).train()
    _, t2 = _crash_and_resume(tmp_path / "resumed", crash_at=12, amp=True)
    assert t2.start_iter == 10 and t2.amp_dtype == torch.bfloat16
    t2.train()
    assert set(t2.model_without_ddp.seen_dtypes) == {torch.bfloat16}
    a, meta_a = read_checkpoint(tmp_path / "straight" / "model_final.pth")
    b, meta_b = read_checkpoint(tmp_path / "resumed" / "model_final.pth")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for x, y in zip(meta_a["optimizer"]["state"].values(), meta_b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    fp32, _ = read_checkpoint(tmp_path / "fp32" / "model_final.pth")
    assert max_abs_diff(a, fp32) > 0


def test_grad_scaler_state_round_trips_through_checkpoint_and_resume(tmp_path, caplog):
    """The GradScaler (CUDA AMP) state is saved in every checkpoint under "scaler" and restored by
    resume_or_load, without a GPU: a CPU GradScaler (same state_dict as the CUDA one) is put into
    CPU trainers. Growth every 3 finite steps from 2**10: after the 5 steps of model_0000004.pth
    the scale is 2**11 with 2 steps towards the next growth; after all 20 steps 2**16, 2 steps."""
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        pytest.skip(f"torch {torch.__version__} has no torch.amp.GradScaler (torch >= 2.3)")
    try:
        torch.amp.GradScaler("cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        pytest.skip(f"torch {torch.__version__} has no CPU GradScaler: {e}")

    def saved(scale, tracker, interval=3):
        return {"scale": scale, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": interval,
                "_growth_tracker": tracker}

    made = []

    def scaler():  # the first one is the interrupted run's; the resumed run's starts elsewhere
        s = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10 if not made else 7.0,
                                 growth_interval=3 if not made else 1000)
        made.append(s)
        return s

    out = tmp_path / "run"
    t1, t2 = _crash_and_resume(out, crash_at=7, amp=True, scaler=scaler)
    _, meta = read_checkpoint(out / "model_0000004.pth")
    assert meta["scaler"] == saved(2.0 ** 11, 2)
    assert t1.scaler.state_dict() == saved(2.0 ** 12, 1)  # iterations 5 and 6 ran before the crash
    assert t2.scaler is made[1] and t2.scaler.state_dict() == saved(2.0 ** 11, 2)
    t2.train()
    _, final = read_checkpoint(out / "model_final.pth")
    assert final["scaler"] == t2.scaler.state_dict() == saved(2.0 ** 16, 2)

    # a checkpoint without a scaler state (written without one): the scale starts afresh, with a warning
    plain = tmp_path / "plain"
    make_trainer(toy_cfg(plain, MAX_ITER=5)).train()
    t3 = make_trainer(toy_cfg(plain, MAX_ITER=6))
    t3.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with caplog.at_level(logging.WARNING, logger="mask2former"):
        t3.resume_or_load(resume=True)
    assert t3.scaler.state_dict()["scale"] == 8.0
    assert any("no GradScaler state" in r.getMessage() for r in caplog.records)


def _interrupted_then_resumed(tmp_path, tensorboard):
    """A straight 20-iteration run and one that crashes before iteration 13 (last checkpoint:
    iteration 9) with a torn last metrics.json line, then resumes; one metrics line per iteration."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    make_trainer(toy_cfg(straight), log_period=1, tensorboard=tensorboard).train()
    cfg = toy_cfg(resumed)
    with pytest.raises(Crash):
        make_trainer(cfg, loader=toy_loader(crash_at=13), log_period=1, tensorboard=tensorboard).train()
    assert (resumed / "last_checkpoint").read_text().strip() == "model_0000009.pth"
    assert [r["iteration"] for r in read_metrics(resumed)] == list(range(13))
    with open(resumed / "metrics.json", "a") as f:
        f.write('{"iteration": 13, "total_loss": 0.')  # killed while writing
    if tensorboard:  # event files are named by the second they are opened in, then a per-process counter
        time.sleep(1.01 - time.time() % 1)
    t = make_trainer(cfg, log_period=1, tensorboard=tensorboard)
    t.resume_or_load(resume=True)
    t.train()
    return straight, resumed


TRAIN_SCALARS = ("total_loss", "loss_a", "loss_b", "lr", "grad_norm")


def test_metrics_json_is_pruned_on_resume(tmp_path):
    """Resuming drops the metrics.json lines past the checkpoint (iterations 10-12, logged again by
    the resumed run) and the torn last line: one complete line per iteration, each with the values
    of the uninterrupted run."""
    straight, resumed = _interrupted_then_resumed(tmp_path, tensorboard=False)
    text = (resumed / "metrics.json").read_text()
    assert text.endswith("}\n") and "0.{" not in text
    rows = read_metrics(resumed)
    assert [r["iteration"] for r in rows] == list(range(20))
    for r, ref in zip(rows, read_metrics(straight)):
        for k in TRAIN_SCALARS:
            assert r[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), (r["iteration"], k)


def test_tensorboard_scalars_after_resume(tmp_path):
    """Read back with TensorBoard's own reader, each step of a resumed run appears once with the
    value in metrics.json: purge_step drops the interrupted run's steps past its checkpoint."""
    ea_mod = require_module("tensorboard.backend.event_processing.event_accumulator",
                            "pip install -e '.[tensorboard]' (included in the dev extra)")
    straight, resumed = _interrupted_then_resumed(tmp_path, tensorboard=True)
    assert len([f for f in os.listdir(resumed) if f.startswith("events.out.tfevents")]) == 2
    acc = ea_mod.EventAccumulator(str(resumed), size_guidance={ea_mod.SCALARS: 0})
    acc.Reload()
    rows = read_metrics(resumed)
    for k in TRAIN_SCALARS:
        events = acc.Scalars(k)
        assert [e.step for e in events] == list(range(20)), k
        assert [e.value for e in events] == pytest.approx([float(np.float32(r[k])) for r in rows], rel=1e-6), k


def test_metrics_tensorboard_and_log_lines(tmp_path, caplog):
    cfg = toy_cfg(tmp_path, MAX_ITER=6, CHECKPOINT_PERIOD=0)
    t = make_trainer(cfg, tensorboard=True)
    with caplog.at_level(logging.INFO, logger="mask2former"):
        t.train()
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [4, 5]
    for r in rows:
        assert {"total_loss", "loss_a", "loss_b", "lr", "time", "data_time", "eta_seconds", "grad_norm"} <= set(r)
    if importlib.util.find_spec("tensorboard") is not None:  # optional dependency ("tensorboard" extra)
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    lines = [r.getMessage() for r in caplog.records if "iter: " in r.getMessage()]
    assert lines and "eta:" in lines[0] and "lr:" in lines[0] and "loss_a:" in lines[0]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"


class EvalTrainer(Trainer):
    """Fake test pipeline; evaluation draws from every global RNG on purpose."""

    @classmethod
    def build_test_loader(cls, cfg, name):
        g = torch.Generator().manual_seed(5)
        return [[{"x": torch.randn(8, generator=g)}] for _ in range(3)]

    @classmethod
    def build_evaluator(cls, cfg, name, output_dir):
        return name

    @classmethod
    def inference_on_dataset(cls, model, loader, evaluator):
        model.eval()
        with torch.no_grad():
            total = sum(float(model(b)[0]["pred"].sum()) for b in loader)
        torch.rand(10), random.random(), np.random.rand()
        model.train()
        return {"toy_task": {"score": total, "name_len": len(evaluator)}}


def test_periodic_eval_does_not_change_training_and_writes_results(tmp_path):
    ref = tmp_path / "ref"
    make_trainer(toy_cfg(ref, MAX_ITER=10)).train()
    cfg = toy_cfg(tmp_path / "eval", MAX_ITER=10)
    cfg.DATASETS.TEST = ("toy_val",)
    cfg.TEST.EVAL_PERIOD = 3
    t = make_trainer(cfg, cls=EvalTrainer)
    results = t.train()
    a, _ = read_checkpoint(ref / "model_final.pth")
    b, _ = read_checkpoint(tmp_path / "eval" / "model_final.pth")
    assert max_abs_diff(a, b) == 0
    assert set(results) == {"toy_task"} and results["toy_task"]["name_len"] == 7
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    evals = [r for r in read_metrics(tmp_path / "eval") if "toy_task/score" in r]
    assert [r["iteration"] for r in evals] == [2, 5, 8, 9]

    cfg.DATASETS.TEST = ("toy_val", "toy_val2")
    res = EvalTrainer.test(cfg, ToyNet())
    assert set(res) == {"toy_val", "toy_val2"} and res["toy_val2"]["toy_task"]["name_len"] == 8


# ----------------------------------------------------------------------------- hooks
class EMAHook(HookBase):
    """Exponential moving average of the model's floating-point weights, kept in the hook's state
    (what an EMA hook needs; written here without any change to the loop or the Trainer)."""

    def __init__(self, decay=0.8):
        self.decay = decay
        self.ema = None

    def after_step(self):
        weights = self.trainer.model_without_ddp.state_dict()
        with torch.no_grad():
            if self.ema is None:
                self.ema = {k: v.detach().clone() for k, v in weights.items() if v.is_floating_point()}
            else:
                for k, v in self.ema.items():
                    v.mul_(self.decay).add_(weights[k], alpha=1 - self.decay)

    def state_dict(self):
        return {} if self.ema is None else {"ema": self.ema}

    def load_state_dict(self, state):
        self.ema = {k: v.clone() for k, v in state["ema"].items()}


def test_ema_hook_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    t = make_trainer(toy_cfg(straight))
    ema = EMAHook()
    t.register_hooks([ema])
    t.train()

    t1 = make_trainer(toy_cfg(resumed), loader=toy_loader(crash_at=12))
    t1.register_hooks([EMAHook()])
    with pytest.raises(Crash):
        t1.train()
    assert (resumed / "last_checkpoint").read_text().strip() == "model_0000009.pth"
    t2 = make_trainer(toy_cfg(resumed))
    ema2 = EMAHook()
    t2.register_hooks([ema2])
    t2.resume_or_load(resume=True)
    assert t2.start_iter == 10
    t2.train()

    assert ema.ema.keys() == ema2.ema.keys()
    assert [k for k in ema.ema if not torch.equal(ema.ema[k], ema2.ema[k])] == []
    # the average is not the model itself, and the final checkpoint holds it
    assert max_abs_diff(ema.ema, {k: t.model_without_ddp.state_dict()[k] for k in ema.ema}) > 0
    _, meta = read_checkpoint(resumed / "model_final.pth")
    assert all(torch.equal(meta["hooks"]["EMAHook"]["ema"][k], v) for k, v in ema2.ema.items())


class CounterHook(HookBase):
    """Counts its steps; state: {"steps": int, "sum": tensor}."""

    def __init__(self):
        self.steps = 0
        self.total = torch.zeros(2)
        self.at_start = None

    def before_train(self):
        self.at_start = (self.steps, self.total.clone())

    def after_step(self):
        self.steps += 1
        self.total += torch.tensor([1.0, float(self.trainer.iter)])

    def state_dict(self):
        return {"steps": self.steps, "sum": self.total}

    def load_state_dict(self, state):
        self.steps, self.total = int(state["steps"]), state["sum"].clone()


def test_hook_state_round_trips_through_checkpoints(tmp_path, caplog):
    plain = tmp_path / "plain"
    make_trainer(toy_cfg(plain, MAX_ITER=6, CHECKPOINT_PERIOD=3)).train()
    _, meta = read_checkpoint(plain / "model_final.pth")
    assert "hooks" not in meta  # the default hooks have no state

    out = tmp_path / "run"
    t = make_trainer(toy_cfg(out, MAX_ITER=6, CHECKPOINT_PERIOD=3))
    t.register_hooks([CounterHook()])
    t.train()
    _, meta = read_checkpoint(out / "model_0000002.pth")
    assert meta["hooks"]["CounterHook"]["steps"] == 3
    assert torch.equal(meta["hooks"]["CounterHook"]["sum"], torch.tensor([3.0, 3.0]))

    # a fresh hook gets the state of the checkpoint it resumes from, then continues
    (out / "last_checkpoint").write_text("model_0000002.pth\n")
    t2 = make_trainer(toy_cfg(out, MAX_ITER=6, CHECKPOINT_PERIOD=3))
    hook = CounterHook()
    t2.register_hooks([hook])
    t2.resume_or_load(resume=True)
    t2.train()
    assert hook.at_start[0] == 3 and torch.equal(hook.at_start[1], torch.tensor([3.0, 3.0]))
    assert hook.steps == 6 and torch.equal(hook.total, torch.tensor([6.0, 15.0]))

    # a checkpoint without "hooks" (older, or written without stateful hooks) still resumes: the
    # hook starts afresh; a state for a hook that is not registered is reported and ignored
    t3 = make_trainer(toy_cfg(plain, MAX_ITER=8, CHECKPOINT_PERIOD=3))
    fresh = CounterHook()
    t3.register_hooks([fresh])
    t3.resume_or_load(resume=True)
    t3.train()
    assert fresh.at_start[0] == 0 and fresh.steps == 2
    t4 = make_trainer(toy_cfg(out, MAX_ITER=7, CHECKPOINT_PERIOD=3))
    t4.resume_or_load(resume=True)
    with caplog.at_level(logging.WARNING, logger="mask2former"):
        t4.train()
    assert any("CounterHook" in r.getMessage() and "not registered" in r.getMessage() for r in caplog.records)

    t5 = make_trainer(toy_cfg(tmp_path / "twice", MAX_ITER=2, CHECKPOINT_PERIOD=1))
    t5.register_hooks([CounterHook(), CounterHook()])
    with pytest.raises(ValueError, match="CounterHook"):
        t5.train()


class Probe(HookBase):
    """Records, after each step, what the hooks before it have done for that step."""

    def __init__(self, priority, seen):
        self.priority = priority
        self.seen = seen

    def after_step(self):
        t = self.trainer
        i = t.iter
        out = Path(t.output_dir)
        rows = read_metrics(out) if (out / "metrics.json").exists() else []
        self.seen.append((self.priority, i, {
            "checkpoint": (out / f"model_{i:07d}.pth").exists(),
            "eval": any(it == i for it, _ in t.records) or any(r["iteration"] == i and "toy_task/score" in r
                                                             for r in rows),
            "log": any(r["iteration"] == i and "total_loss" in r for r in rows),
        }))


def test_hook_order_and_after_step_order(tmp_path):
    cfg = toy_cfg(tmp_path, MAX_ITER=8, CHECKPOINT_PERIOD=4)
    cfg.DATASETS.TEST = ("toy_val",)
    cfg.TEST.EVAL_PERIOD = 4
    t = EvalTrainer(cfg, build_model=lambda c: ToyNet(), build_train_loader=toy_loader(), log_period=4,
                    tensorboard=False, progress_bar=False)
    seen = []
    t.register_hooks([Probe(45, seen), Probe(35, seen), Probe(25, seen), None, Probe(HookBase.priority, seen)])
    names = [type(h).__name__ + (f"@{h.priority}" if isinstance(h, Probe) else "") for h in t.hooks]
    assert names == ["LRLogger", "Probe@15", "PeriodicCheckpointer", "Probe@25", "EvalHook", "Probe@35",
                     "MetricsWriter", "Probe@45", "ProgressBar"]
    t.train()
    at3 = {p: done for p, i, done in seen if i == 3}
    assert at3[15] == {"checkpoint": False, "eval": False, "log": False}
    assert at3[25] == {"checkpoint": True, "eval": False, "log": False}
    assert at3[35] == {"checkpoint": True, "eval": True, "log": False}
    assert at3[45] == {"checkpoint": True, "eval": True, "log": True}
    at7 = {p: done for p, i, done in seen if i == 7}  # the final evaluation comes after training
    assert at7[45] == {"checkpoint": True, "eval": False, "log": True}
    assert (tmp_path / "model_final.pth").exists()
    rows = read_metrics(tmp_path)
    assert [(r["iteration"], "toy_task/score" in r) for r in rows] == [(3, True), (3, False), (7, False), (7, True)]


def test_atomic_write_failure_keeps_previous_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, "old \u00e9\n")
    os.chmod(path, 0o640)

    def dies_half_way(f):
        f.write(b"partial")
        raise OSError("No space left on device")

    for content, error in ((dies_half_way, OSError), (3, TypeError)):
        with pytest.raises(error):
            atomic_write(path, content)
        assert path.read_text(encoding="utf-8") == "old \u00e9\n"
        assert os.listdir(tmp_path) == ["out.txt"]

    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o640
    atomic_write(str(tmp_path / "sub" / "t.pth"), lambda f: torch.save({"a": torch.ones(2)}, f))
    assert torch.equal(torch.load(tmp_path / "sub" / "t.pth", weights_only=True)["a"], torch.ones(2))
    assert ((tmp_path / "sub" / "t.pth").stat().st_mode & 0o777) == 0o644

    # what a killed writer leaves behind is removed for the names asked for only
    for name in (".out.txt.k3j2.tmp", ".other.txt.x.tmp", "out.txt.tmp"):
        (tmp_path / name).write_text("x")
    remove_stale_temp_files(str(tmp_path), ["out.txt."])
    assert sorted(os.listdir(tmp_path)) == [".other.txt.x.tmp", "out.txt", "out.txt.tmp", "sub"]


def test_cuda_device_without_cuda_falls_back_to_cpu(tmp_path, monkeypatch, caplog):
    """MODEL.DEVICE cuda with CUDA absent (simulated): build_model and the Trainer warn and put the
    model on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = mask2former.get_cfg()
    cfg.merge_from_file(str(REPO / "configs/synthetic/panoptic.yaml"))
    cfg.MODEL.DEVICE = "cuda"
    cfg.OUTPUT_DIR = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mask2former"):
        model = mask2former.build_model(cfg, load_weights=False)
        trainer = Trainer(cfg, tensorboard=False, progress_bar=False)
    warning = "MODEL.DEVICE is 'cuda' but CUDA is not available; using the CPU"
    assert [r.getMessage() for r in caplog.records].count(warning) == 2
    for m in (model, trainer.model_without_ddp):
        assert {t.device.type for t in itertools.chain(m.parameters(), m.buffers())} == {"cpu"}
    assert trainer.device.type == "cpu" and trainer.scaler is None


# ----------------------------------------------------------------------------- command line
def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_parser_engine_and_launch_errors(tmp_path, monkeypatch, capsys):
    from mask2former.engine.defaults import default_argument_parser, setup

    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    parser = default_argument_parser()
    args = parser.parse_args(["--config-file", "x.yaml", "--resume", "SOLVER.BASE_LR", "0.5"])
    assert args.resume and not args.eval_only and args.engine == "ours"
    assert args.opts == ["SOLVER.BASE_LR", "0.5"]

    args = parser.parse_args(["--num-gpus", "2", "SOLVER.MAX_ITER", "5"])
    with pytest.raises(SystemExit) as e:
        setup(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node 2" in err and "SOLVER.MAX_ITER 5" in err

    # --engine detectron2: which message is right depends on whether Detectron2 imports, so each
    # case is set up here (None in sys.modules makes the import fail) and asserts its own message
    import sys
    import types

    args = parser.parse_args(["--engine", "detectron2"])
    monkeypatch.setitem(sys.modules, "detectron2", None)
    with pytest.raises(SystemExit) as e:
        setup(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("--engine detectron2 needs Detectron2, which is not installed. Install it with\n"
                          "    pip install 'git+https://github.com/facebookresearch/detectron2.git'\n")
    assert "not implemented" not in err
    monkeypatch.setitem(sys.modules, "detectron2", types.ModuleType("detectron2"))
    with pytest.raises(SystemExit) as e:
        setup(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("--engine detectron2 is not implemented by mask2former.engine.setup")
    assert "train_net.py --engine detectron2 runs mask2former.detectron2.trainer" in err and "pip install" not in err


def test_cli_setup_and_eval_only(tmp_path, monkeypatch, capsys):
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    train_net = _train_net()
    out = tmp_path / "out"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("SOLVER:\n  BASE_LR: 0.123\n")
    parser = train_net.default_argument_parser()
    args = parser.parse_args(["--config-file", str(cfg_file), "--eval-only", "OUTPUT_DIR", str(out),
                              "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    cfg = train_net.setup(args)
    assert cfg.is_frozen() and cfg.SOLVER.BASE_LR == 0.123
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS"):
        train_net.evaluate(cfg, args)

    # eval-only on a trained toy checkpoint with the fake test pipeline
    make_trainer(toy_cfg(tmp_path / "run", MAX_ITER=2)).train()

    class CliEval(EvalTrainer):
        @classmethod
        def build_model(cls, cfg):
            return ToyNet()

    args = parser.parse_args(["--eval-only", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
                              "MODEL.WEIGHTS", str(tmp_path / "run" / "model_final.pth"),
                              "DATASETS.TEST", "('toy_val',)"])
    results = train_net.main(args, trainer_cls=CliEval)
    assert "toy_task" in results
    assert json.loads((out / "eval_results.json").read_text())["toy_task"]["name_len"] == 7
    assert "toy_task/score" in capsys.readouterr().out


def test_sync_bn_becomes_bn_for_cpu_process_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    weight = model[1].weight
    model[1].running_mean.fill_(0.5)
    out = trainer_mod._sync_bn_to_bn(model)
    assert type(out[1]) is nn.BatchNorm2d and out[1].weight is weight
    assert torch.equal(out[1].running_mean, torch.full((4,), 0.5))
    out.train()(torch.randn(2, 3, 5, 5))


_KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_trainer import make_trainer, toy_cfg
make_trainer(toy_cfg({out!r}, MAX_ITER=100000, CHECKPOINT_PERIOD=1)).train()
"""


@pytest.mark.slow
def test_kill_9_leaves_loadable_last_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(tests=str(REPO / "tests"), out=str(out))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last_checkpoint").exists():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the middle of writing checkpoints
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    name = (out / "last_checkpoint").read_text().strip()
    _, meta = read_checkpoint(out / name)
    assert name == f"model_{meta['iteration']:07d}.pth"
    t = make_trainer(toy_cfg(out, MAX_ITER=100000, CHECKPOINT_PERIOD=1))
    t.resume_or_load(resume=True)
    assert t.start_iter == meta["iteration"] + 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
