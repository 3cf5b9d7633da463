"""Generators that a model's modules keep themselves (outside the global RNGs) are part of the
run's RNG state: get_rng_states(model) / set_rng_states(states, model) save and restore them
through the modules' ``rng_state_dict`` / ``load_rng_state_dict``, and the trainer's checkpoints
carry them, so an interrupted and resumed run reproduces the uninterrupted one. Toy model."""
import logging

import torch
from torch import nn

from mask2former.checkpoint import read_checkpoint
from mask2former.engine import Trainer
from mask2former.utils.rng import get_rng_states, set_rng_states
from tests.test_trainer import Crash, ToyBackbone, ToyNet, toy_cfg, toy_loader

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OwnNoise(nn.Module):
    """Adds noise from a generator of its own, created on first use (as kMaX's criterion does)."""

    def __init__(self):
        super().__init__()
        self.generator = None

    def forward(self, x):
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(5)
        return x + torch.randn(x.shape, generator=self.generator)

    def rng_state_dict(self):
        return {} if self.generator is None else {"cpu": self.generator.get_state()}

    def load_rng_state_dict(self, state):
        self.generator = torch.Generator()
        self.generator.set_state(state["cpu"])


class NoisyToyNet(ToyNet):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(ToyBackbone(), OwnNoise())


def trainer(cfg, loader=None):
    return Trainer(cfg, build_model=lambda c: NoisyToyNet(), build_train_loader=loader or toy_loader(),
                   tensorboard=False, progress_bar=False)


def test_a_modules_own_generator_travels_with_the_checkpoint(tmp_path):
    trainer(toy_cfg(tmp_path / "straight")).train()
    cfg = toy_cfg(tmp_path / "resumed")
    with pytest.raises(Crash):
        trainer(cfg, toy_loader(crash_at=12)).train()
    _, meta = read_checkpoint(tmp_path / "resumed" / "model_0000009.pth")
    assert list(meta["rng_states"][0]["modules"]) == ["backbone.1"]
    t2 = trainer(cfg)
    t2.resume_or_load(resume=True)
    assert t2.start_iter == 10
    t2.train()
    a, _ = read_checkpoint(tmp_path / "straight" / "model_final.pth")
    b, _ = read_checkpoint(tmp_path / "resumed" / "model_final.pth")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_rng_states_with_a_model_roundtrip_weights_only(tmp_path, caplog):
    model = NoisyToyNet()
    assert "modules" not in get_rng_states() and get_rng_states(model)["modules"] == {}  # nothing drawn yet
    x = torch.zeros(2, 16)
    model.backbone[1](x)
    torch.save(get_rng_states(model), tmp_path / "rng.pth")
    expected = model.backbone[1](x)
    fresh = NoisyToyNet()
    set_rng_states(torch.load(tmp_path / "rng.pth", weights_only=True), fresh)
    assert torch.equal(fresh.backbone[1](x), expected)

    with caplog.at_level(logging.WARNING, logger="mask2former"):
        set_rng_states(get_rng_states(model), ToyNet())
    assert "generator state for module 'backbone.1', which this model does not have" in caplog.text
