"""MP-Former at the model level (issue 15): with NUM_DN 0 a training step, and in eval mode the
inference, are Mask2Former's bitwise; released and Mask2Former checkpoints load; bad MP settings
fail naming the key; the MP configs hold the released setting and the DN_query configs the
official values; three training iterations of configs/synthetic/panoptic_mp.yaml.

Models are the synthetic configs shrunk (32 channels, 6 queries, a thin ResNet-50, 64x64 images)."""
import json
import logging
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import mask2former as m2f
from mask2former.accel import plain_type
from mask2former.modeling.criterion import build_criterion
from mask2former.structures import Instances
from tests.conftest import REPO, require_shared
from tests.test_config import _SEMASK_KEYS, _flat, _load
from tests.test_manifests import build_from_official_path
from tests.test_train_synthetic import NoEvalTrainer, make_cfg, small_synthetic  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYNTHETIC = REPO / "configs" / "synthetic"
LABEL_ENC = "sem_seg_head.predictor.label_enc.weight"
QUERY_EMBED = "sem_seg_head.predictor.query_embed.weight"
TINY = ["MODEL.MASK_FORMER.HIDDEN_DIM", 32, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 6,
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 64,
        "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
        "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64]
DN_NAMES = {f"{a}_dn{b}" for a in ("loss_ce", "loss_mask", "loss_dice") for b in ("", "_0", "_1", "_2")}


def tiny_model(config="panoptic_mp.yaml", *opts):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(SYNTHETIC / config))
    cfg.merge_from_list(TINY + list(opts))
    torch.manual_seed(0)
    return m2f.build_model(cfg, load_weights=False)


def sample(seed, boxes, classes, size=64):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for m, (y0, x0, y1, x1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
        image[:, m] = 40 * len(boxes)
    return {"image": image, "instances": Instances((size, size), gt_classes=torch.tensor(classes, dtype=torch.long),
                                                   gt_masks=masks)}


def batch():
    return [sample(0, [(4, 4, 28, 30), (34, 8, 60, 50), (8, 38, 24, 60)], [1, 3, 4]),
            sample(1, [(10, 12, 40, 44)], [2])]


@pytest.fixture(scope="module")
def twins():
    """Plain Mask2Former with zero query positions, and the MaskDN model (NUM_DN 0) with its weights."""
    plain = tiny_model("panoptic.yaml")
    mp = tiny_model("panoptic_mp.yaml", "MODEL.DN.NUM_DN", 0)
    result = mp.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == [LABEL_ENC] and result.unexpected_keys == []
    with torch.no_grad():
        plain.sem_seg_head.predictor.query_embed.weight.zero_()
    return plain, mp


def train_step(model, data, seed=3):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the criterion's random loss points
    losses = model(data)
    sum(losses.values()).backward()
    return losses, {k: p.grad for k, p in model.named_parameters()}


# ---- Mask2Former unchanged ----------------------------------------------------------------------
def test_num_dn_0_training_step_is_mask2formers_bitwise(twins):
    (plain_losses, plain_grads), (losses, grads) = (train_step(m, batch()) for m in twins)
    assert set(losses) == set(plain_losses) | DN_NAMES
    assert [k for k in plain_losses if not torch.equal(losses[k], plain_losses[k])] == []
    assert all(losses[k].item() == 0 for k in DN_NAMES)
    assert set(grads) == set(plain_grads) - {QUERY_EMBED} | {LABEL_ENC}
    assert [k for k in plain_grads if k != QUERY_EMBED and not torch.equal(grads[k], plain_grads[k])] == []
    # label_enc stays in the graph with a zero gradient, as DistributedDataParallel needs
    assert grads[LABEL_ENC] is not None and not grads[LABEL_ENC].any()


def test_every_parameter_gets_a_gradient_without_objects():
    model = tiny_model()
    _, grads = train_step(model, [sample(2, [], []), sample(3, [], [])])
    assert [k for k, g in grads.items() if g is None] == []


def test_inference_is_mask2formers_bitwise(twins):
    outputs, results = [], []
    for model in twins:
        model.eval()
        handle = model.sem_seg_head.register_forward_hook(lambda m, args, out: outputs.append(out))
        with torch.no_grad():
            results.append(model([{"image": s["image"]} for s in batch()]))
        handle.remove()
    a, b = outputs
    assert "dn_out" not in b
    for x, y in [(a, b)] + list(zip(a["aux_outputs"], b["aux_outputs"])):
        assert torch.equal(x["pred_logits"], y["pred_logits"]) and torch.equal(x["pred_masks"], y["pred_masks"])
    for x, y in zip(*results):
        assert torch.equal(x["sem_seg"], y["sem_seg"]) and torch.equal(x["panoptic_seg"][0], y["panoptic_seg"][0])


# ---- checkpoints ------------------------------------------------------------------------------
def test_released_checkpoint_manifest_loads_clean(parity_dir):
    spec = json.loads(require_shared(parity_dir / "mpformer" / "manifest_mpformer_coco_instance_R50.json").read_text())
    model = build_from_official_path(spec["config"], overrides=spec["overrides"])
    assert plain_type(model.sem_seg_head.predictor).__name__ == "MultiScaleMaskedTransformerDecoderMaskDN"
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) ^ set(spec["keys"])) == []
    assert {k: v for k, v in ours.items() if v != list(spec["keys"][k])} == {}


def test_mask2former_checkpoint_trains_with_mp(twins, tmp_path, caplog):
    """query_embed has no place in the MaskDN decoder: load_state_dict drops it with a log line;
    load_checkpoint (MODEL.WEIGHTS) reports it unexpected. label_enc keeps its initialisation."""
    plain = twins[0].state_dict()
    path = tmp_path / "mask2former.pth"
    torch.save({"model": plain}, path)
    model = tiny_model()
    init = model.state_dict()[LABEL_ENC].clone()
    result = m2f.load_checkpoint(model, str(path))
    assert result.missing_keys == [LABEL_ENC] and result.unexpected_keys == [QUERY_EMBED]
    with caplog.at_level(logging.INFO):
        result = model.load_state_dict(plain, strict=False)
    assert result.missing_keys == [LABEL_ENC] and result.unexpected_keys == []
    assert f"{QUERY_EMBED} dropped" in caplog.text
    state = model.state_dict()
    assert torch.equal(state[LABEL_ENC], init)
    assert [k for k, v in plain.items() if k != QUERY_EMBED and not torch.equal(state[k], v)] == []
    losses, grads = train_step(model, batch())
    assert set(losses) == set(model.criterion.weight_dict) >= DN_NAMES
    assert all(math.isfinite(v.item()) for v in losses.values()) and losses["loss_mask_dn"] > 0
    assert grads[LABEL_ENC].abs().sum() > 0


# ---- configuration errors -------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("MODEL.MASK_FORMER.DN_MODE", "dots"), ("MODEL.DN.NUM_DN", -1),
                                       ("MODEL.DN.NOISE_SCALE", -0.1), ("MODEL.MASK_FORMER.LB_NOISE_RATIO", 1.5)])
def test_bad_mp_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(key)):
        tiny_model("panoptic_mp.yaml", key, value)


@pytest.mark.parametrize("key,value", [("MODEL.DN.NUM_DN", 1), ("MODEL.MASK_FORMER.ALL_LY_DN", True),
                                       ("MODEL.MASK_FORMER.DN_MODE", "points")])
def test_a_decoder_without_mp_refuses_mp_settings(key, value):
    with pytest.raises(ValueError, match=re.escape(key) + ".*'MultiScaleMaskedTransformerDecoder' has no mask-piloted"):
        tiny_model("panoptic.yaml", key, value)


def test_an_official_mode_not_implemented_fails_at_the_first_training_step():
    model = tiny_model("panoptic_mp.yaml", "MODEL.MASK_FORMER.DN_MODE", "base").eval()
    with torch.no_grad():
        model([{"image": s["image"]} for s in batch()])  # inference never builds MP queries
    with pytest.raises(NotImplementedError, match="MODEL.MASK_FORMER.DN_MODE 'base'"):
        model.train()(batch())


@pytest.mark.parametrize("no_lb", [False, True])
def test_mp_loss_weights_are_the_official_weight_dict(no_lb):
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(SYNTHETIC / "panoptic_mp.yaml"))
    cfg.merge_from_list(["MODEL.MASK_FORMER.DN_NO_LB", no_lb])
    layer = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_ce_dn": 2.0, "loss_mask_dn": 5.0,
             "loss_dice_dn": 5.0}
    if no_lb:  # the official criterion then drops every loss_ce_dn* term
        del layer["loss_ce_dn"]
    want = dict(layer, **{f"{k}_{i}": v for i in range(3) for k, v in layer.items()})
    assert build_criterion(cfg, 5, mp_losses=True).weight_dict == want
    assert not any("_dn" in k for k in build_criterion(cfg, 5).weight_dict)


# ---- configs ----------------------------------------------------------------------------------
MP_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("mp_former/*.yaml"))
RELEASED = {"num_dn": 1, "noise_scale": 0.0, "dn_mode": "points", "all_layers_dn": True, "head_dn": False,
            "label_noise_ratio": 0.2}
MP_KEYS = {"MODEL.DN.NUM_DN", "MODEL.DN.NOISE_SCALE", "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
           "MODEL.MASK_FORMER.DN_MODE", "MODEL.MASK_FORMER.ALL_LY_DN", "MODEL.MASK_FORMER.LB_NOISE_RATIO"}


def test_every_family_has_an_mp_config():
    assert len(MP_CONFIGS) == 6 and {p.split("/")[1] for p in MP_CONFIGS} == {"ade20k", "cityscapes", "coco"}


@pytest.mark.parametrize("path", MP_CONFIGS + ["configs/synthetic/panoptic_mp.yaml"])
def test_mp_configs_build_the_released_setting_over_their_base(path):
    model = build_from_official_path(path)
    dec = model.sem_seg_head.predictor
    assert plain_type(dec).__name__ == "MultiScaleMaskedTransformerDecoderMaskDN"
    assert {k: getattr(dec, k) for k in RELEASED} == RELEASED
    assert model.criterion.mp_losses and "loss_ce_dn_0" in model.criterion.weight_dict
    base = yaml.safe_load((REPO / path).read_text())["_BASE_"]
    ours, theirs = _flat(_load(path)), _flat(_load(str(Path(path).parent / base)))
    assert {k for k in ours if ours[k] != theirs[k]} - {"OUTPUT_DIR"} <= MP_KEYS


# SOLVER.STEPS and MAX_ITER of MP-Former's four DN_query files (50ep: those of its base)
DN_QUERY = {"12ep": ((73750, 81125), 88500), "24ep": ((162250, 169625), 177000),
            "36ep": ((245000, 260000), 265500), "50ep": ((327778, 355092), 368750)}
# a git mirror of IDEA-Research/MP-Former, where there is one: the whole official files are compared
OFFICIAL_REPO = Path(os.environ.get("MP_FORMER_OFFICIAL_REPO", "/work/.mirror/IDEA-Research+MP-Former/repo"))


def official_config(rel, root):
    """The official config at ``rel`` (its _BASE_ chain copied from the MP-Former mirror under
    ``root``) merged by our loader, and the keys its files set."""
    keys, path = set(), rel
    while path:
        text = subprocess.run(["git", "-C", str(OFFICIAL_REPO), "show", f"HEAD:{path}"], check=True,
                              capture_output=True, text=True).stdout
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
        data = yaml.safe_load(text)
        base = data.pop("_BASE_", None)
        keys |= set(_flat(data))
        path = os.path.normpath(os.path.join(os.path.dirname(path), base)) if base else None
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(root / rel))
    return _flat(cfg), keys


def dn_query(schedule):
    return f"configs/coco/instance-segmentation/maskformer2_R50_bs16_{schedule}_DN_query.yaml"


@pytest.mark.parametrize("schedule", sorted(DN_QUERY))
def test_dn_query_configs_hold_the_official_schedule_and_dn_keys(schedule):
    ours = _flat(_load(dn_query(schedule)))
    steps, max_iter = DN_QUERY[schedule]
    assert (ours["SOLVER.STEPS"], ours["SOLVER.MAX_ITER"], ours["SOLVER.BASE_LR"]) == (list(steps), max_iter, 0.0001)
    assert (ours["MODEL.DN.NUM_DN"], ours["MODEL.DN.NOISE_SCALE"]) == (5, 0.2)
    assert ours["MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"] == "MultiScaleMaskedTransformerDecoder"


@pytest.mark.parametrize("schedule", sorted(DN_QUERY))
def test_dn_query_configs_equal_the_official_files(schedule, tmp_path):
    """Every key the official file and its _BASE_ chain set has the official value."""
    if not (OFFICIAL_REPO / "HEAD").exists():
        pytest.skip(f"no git mirror of IDEA-Research/MP-Former at {OFFICIAL_REPO} (MP_FORMER_OFFICIAL_REPO)")
    official, keys = official_config(dn_query(schedule), tmp_path)
    ours = _flat(_load(dn_query(schedule)))
    assert len(keys) > 40 and {k: (official[k], ours[k]) for k in keys if ours[k] != official[k]} == {}


def test_mp_defaults_are_the_official_ones():
    """The values of IDEA-Research/MP-Former's add_maskformer2_config (config.py at a71f504)."""
    cfg = m2f.get_cfg()
    mf = cfg.MODEL.MASK_FORMER
    assert (cfg.MODEL.DN.NUM_DN, cfg.MODEL.DN.NOISE_SCALE) == (5, 0.2)
    assert (mf.DN_MODE, mf.HEAD_DN, mf.ALL_LY_DN, mf.DN_RATIO, mf.DN_NO_LB, mf.LB_NOISE_RATIO, mf.LAST_Q_RATIO) == (
        "base", False, False, 0.5, False, -1.0, 0.0)
    assert (cfg.SOLVER.INSTANT_DROP, cfg.SOLVER.DROP_EP) == (False, 0)


def test_tiny_parity_dump_loads_with_every_value(parity_dir):
    path = require_shared(parity_dir / "mpformer" / "tiny_mpformer_instance.yaml")
    cfg = m2f.get_cfg()
    cfg.merge_from_file(str(path))
    ours, dumped = _flat(cfg), _flat(yaml.safe_load(path.read_text()))
    assert set(ours) - set(dumped) == _SEMASK_KEYS  # SeMask's keys, which MP-Former's dump predates
    assert {k: v for k, v in ours.items() if k not in _SEMASK_KEYS} == dumped


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_training_iterations_of_the_synthetic_mp_config(small_synthetic, tmp_path):
    trainer = NoEvalTrainer(make_cfg(small_synthetic[1], tmp_path, 3, config=SYNTHETIC / "panoptic_mp.yaml"),
                            log_period=1)
    norms = []
    trainer.model_without_ddp.sem_seg_head.predictor.label_enc.weight.register_hook(
        lambda g: norms.append(g.norm().item()))
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        records = [r for r in map(json.loads, f) if "total_loss" in r]
    assert len(records) == 3 and len(norms) == 3 and max(norms) > 0
    for r in records:
        assert DN_NAMES <= set(r) and all(math.isfinite(r[k]) for k in DN_NAMES | {"total_loss"})
