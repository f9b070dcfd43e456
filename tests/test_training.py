"""The training loop: schedules, determinism, optimizer continuation, that it actually learns, and that evaluation
gives every module its own training flag back."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import search_spaces
from nas_split.data import create_dataset
from nas_split.numerics import evaluating
from nas_split.training import TrainConfig, Trainer, lr_factor, make_optimizer


def test_lr_schedules_hand_values():
    c = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(c, 0.0) == 1.0 and lr_factor(c, 0.5) == pytest.approx(0.5) and lr_factor(c, 1.0) == 0
    assert lr_factor(c, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    s = TrainConfig(epochs=10, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, p) for p in (0.1, 0.5, 0.8)] == pytest.approx([1.0, 0.1, 0.01])
    w = TrainConfig(epochs=10, schedule="constant", warmup_epochs=2)
    assert lr_factor(w, 0.1) == pytest.approx((0.1 + 1e-3) / 0.2) and lr_factor(w, 0.3) == 1.0


def test_no_weight_decay_on_norms_and_biases():
    m = search_spaces.create("test_mlp", 10, 1, input_size=8)
    opt = make_optimizer(m, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert all((id(p) in decayed) == (p.dim() > 1) for p in m.parameters())


def _fit(seed, epochs=2, optimizer=None, model=None):
    data = create_dataset("digits", seed=0)
    cfg = TrainConfig(epochs=epochs, seed=seed, progress=False, lr=0.05)
    trainer = Trainer(cfg)
    model = model or search_spaces.create("test_mlp", 10, 1, input_size=8)
    tr, va, te = data.loaders(64, seed=seed)
    res = trainer.fit(model, tr, va, optimizer=optimizer)
    return trainer, model, res, te


def test_deterministic_given_seed():
    _, a, ra, _ = _fit(1)
    _, b, rb, _ = _fit(1)
    _, c, _, _ = _fit(2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert ra.history[-1]["train_loss"] == rb.history[-1]["train_loss"]
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_learns_digits():
    trainer, model, res, test = _fit(0, epochs=8)
    acc = trainer.evaluate(model, test).acc
    assert acc > 0.9  # an MLP on 8x8 digits; chance is 0.1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert len(res.history) == 8 and {"val_acc", "lr", "seconds"} <= set(res.history[0])


def test_continues_a_given_optimizer_with_its_state():
    _, model, res, _ = _fit(0, epochs=1)
    opt = res.optimizer
    buf = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    assert buf  # momentum was accumulated
    _, _, res2, _ = _fit(0, epochs=1, optimizer=opt, model=model)
    assert res2.optimizer is opt
    # the buffers were continued (SGD updates them in place), not rebuilt from zero
    p = model.classifier.weight
    assert not torch.equal(opt.state[p]["momentum_buffer"], buf[id(p)])
    assert len(opt.state) == len(buf)


def test_nan_loss_is_reported():
    data = create_dataset("digits", seed=0)
    model = search_spaces.create("test_mlp", 10, 1, input_size=8)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    trainer = Trainer(TrainConfig(epochs=1, progress=False))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        trainer.fit(model, data.loaders(64)[0])


def _partly_frozen() -> nn.Module:
    """A model in train mode with one batch norm frozen in eval mode (as a user freezing its statistics would)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3)))
    model.train()
    model[1].eval()
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_evaluating_sets_eval_mode_and_restores_each_modules_own_flag():
    model = _partly_frozen()
    before = _flags(model)
    assert before[""] and not before["1"]  # the parent trains, the norm is frozen
    with evaluating(model) as inside:
        assert inside is model
        assert not any(_flags(model).values())
    assert _flags(model) == before
    with pytest.raises(RuntimeError, match="inside"), evaluating(model):
        assert not any(_flags(model).values())
        raise RuntimeError("inside")
    assert _flags(model) == before


def test_evaluate_keeps_a_frozen_norm_frozen():
    model = _partly_frozen()
    before = _flags(model)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    Trainer(TrainConfig(progress=False)).evaluate(model, DataLoader(data, batch_size=4))
    assert _flags(model) == before
