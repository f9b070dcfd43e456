"""Training an anytime network's levels with the trainer (nas_split.anytime_training): ``last`` is ordinary
training bit for bit, ``sum`` steps on the summed levels' gradient, and training every level with OSGD lowers the
smallest level's loss where training the full model alone does not reach it as well."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import search_spaces
from nas_split import anytime as at
from nas_split.anytime_training import AnytimeConfig, LevelStep, trained_levels
from nas_split.errors import ConfigError
from nas_split.surgery import NewChannels, add_channels
from nas_split.training import TrainConfig, Trainer


def _two_levels():
    """A test MLP with level 0 (the seed) and level 1 (four new channels per hidden layer, random fan-in and
    fan-out)."""
    torch.manual_seed(0)
    model = search_spaces.create("test_mlp", 4, 1, 6)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 4, (64,))
    at.add_level(model, x)
    gen = torch.Generator().manual_seed(1)
    add_channels(model, x[:2], {"features.1": NewChannels(4, torch.randn(4, 36, generator=gen) * 0.1,
                                                          {"features.4": torch.randn(4, 8, generator=gen) * 0.1}),
                                "features.4": NewChannels(4, torch.randn(4, 16, generator=gen) * 0.1,
                                                          {"classifier": torch.randn(4, 4, generator=gen) * 0.1})})
    at.add_level(model, x)
    return model, x, y


def _fit(model, x, y, step=None, epochs=3):
    trainer = Trainer(TrainConfig(epochs=epochs, lr=0.1, schedule="constant", progress=False, seed=0, batch_size=16))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    trainer.fit(model, loader, train_step=step)
    return model


def _level_loss(model, x, y, k):
    with torch.no_grad(), at.set_level(model, k):
        return F.cross_entropy(model.eval()(x), y).item()


def test_trained_levels_are_all_or_the_last_k():
    model, _, _ = _two_levels()
    assert trained_levels(model, AnytimeConfig()) == [0, 1]
    assert trained_levels(model, AnytimeConfig(levels=1)) == [1]
    assert trained_levels(model, AnytimeConfig(levels=5)) == [0, 1]


def test_last_is_ordinary_training_bit_for_bit():
    model, x, y = _two_levels()
    plain = _fit(copy.deepcopy(model), x, y)
    last = _fit(copy.deepcopy(model), x, y, step=LevelStep(AnytimeConfig(optimizer="last")))
    for (n, a), b in zip(plain.state_dict().items(), last.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_sum_steps_on_the_summed_levels_gradient():
    model, x, y = _two_levels()
    ref = copy.deepcopy(model)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    LevelStep(AnytimeConfig(optimizer="sum"))(m, m.train(), x, y, F.cross_entropy, lambda: torch.enable_grad())
    ref.train()
    with at.set_level(ref, 0):
        small = F.cross_entropy(ref(x), y)
    (small + F.cross_entropy(ref(x), y)).backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    opt.step()


def test_osgd_trains_the_small_level_that_last_leaves_behind():
    model, x, y = _two_levels()
    before = _level_loss(model, x, y, 0)
    osgd = _fit(copy.deepcopy(model), x, y, step=LevelStep(AnytimeConfig()), epochs=5)
    last = _fit(copy.deepcopy(model), x, y, step=LevelStep(AnytimeConfig(optimizer="last")), epochs=5)
    assert _level_loss(osgd, x, y, 0) < min(before, _level_loss(last, x, y, 0))
    assert _level_loss(osgd, x, y, 1) < _level_loss(model, x, y, 1)  # the full model learns too


def test_own_step_refuses_a_regularizer():
    model, x, y = _two_levels()
    with pytest.raises(ConfigError, match="no regularizer"):
        Trainer(TrainConfig(epochs=1, progress=False)).fit(
            model, DataLoader(TensorDataset(x, y), batch_size=16), regularizer=lambda m: 0.0,
            train_step=LevelStep(AnytimeConfig()))


def test_an_anytime_stage_runner_records_every_level():
    from nas_split.cost import count_macs, training_macs
    from nas_split.data import create_dataset
    from nas_split.stages import StageRunner

    torch.manual_seed(0)
    data = create_dataset("digits", seed=0)
    model = search_spaces.create("test_mlp", 10, 1, 8)
    x = torch.stack([data.train[i][0] for i in range(8)])
    runner = StageRunner(data=data, recipe=TrainConfig(epochs=1, progress=False, seed=0), example_inputs=x,
                         latency=False, anytime=AnytimeConfig())
    runner.stage(model, "seed", 1)
    add_channels(model, x[:2], {"features.1": NewChannels(4, torch.randn(4, 64) * 0.1)})
    runner.stage(model, "round", 1)
    seed_rec, grown = runner.records
    assert [r["level"] for r in seed_rec.extra["levels"]] == [0] and len(grown.extra["levels"]) == 2
    _, _, te = runner.loaders(1)
    for k, row in enumerate(grown.extra["levels"]):  # against the level run in place, an independent path
        with at.set_level(model, k):
            assert row["macs"] == count_macs(model, x)[0]
            assert row["test_acc"] == pytest.approx(runner.trainer.evaluate(model, te).acc, abs=1e-9)
    assert grown.extra["levels"][1]["macs"] == grown.macs > grown.extra["levels"][0]["macs"]
    both = sum(r["macs"] for r in grown.extra["levels"])
    assert grown.train_macs == training_macs(both, grown.extra["train_samples"])  # every level trained per sample


def _stage(mmacs, acc, levels=None):
    st = {"stage": 0, "kind": "round", "epochs": 1, "epochs_total": 3, "test_acc": acc, "test_loss": 1.0,
          "val_acc": None, "train_seconds": 1.0, "history": [], "widths": {"a": 8},
          "cost": {"macs": int(mmacs * 1e6), "mmacs": mmacs, "params": 10, "energy_uj_est": 1.0, "priced": 1.0,
                   "latency_ms": None}, "train_macs": 3e9}
    if levels:
        st["levels"] = levels
    return st


def test_an_anytime_run_reports_one_row_per_level_against_the_scratch_curve():
    from types import SimpleNamespace

    from nas_split.report import collect, markdown_table

    def run(label, seed, method, mmacs, acc, levels=None):
        res = {"schema_version": 1, "command": "run", "method": method, "from_scratch": method == "scratch",
               "config": {"method": method}, "stages": [_stage(mmacs, acc, levels)], "status": "done",
               "wall_seconds": 5.0}
        return SimpleNamespace(label=label, seed=seed, target_mmacs=4.0, phase="search",
                               config=SimpleNamespace(out="x")), res

    levels = [{"level": 0, "macs": 2_000_000, "mmacs": 2.0, "priced": 0.5, "test_acc": 0.65, "test_loss": 1.0,
               "widths": {"a": 4}},
              {"level": 1, "macs": 4_000_000, "mmacs": 4.0, "priced": 1.0, "test_acc": 0.8, "test_loss": 1.0,
               "widths": {"a": 8}}]
    pairs = [run("scratch", 0, "scratch", 4.0, 0.7), run("small", 0, "scratch", 1.0, 0.5),
             run("fast", 0, "fast", 4.0, 0.8, levels)]
    pairs[1][0].phase = "curve"
    _, finals, _ = collect(pairs)
    by = {r.label: r for r in finals}
    low = by["fast L0"]
    # the curve through (1, 0.5) and (4, 0.7), linear in log MACs, is 0.6 at 2 MMACs (hand-derived)
    assert (low.level, low.family, low.mmacs, low.test_acc) == (0, "fast", 2.0, 0.65)
    assert low.curve_acc == pytest.approx(0.6) and by["fast"].curve_acc == pytest.approx(0.7)
    assert low.train_macs == by["fast"].train_macs  # one run gives every level: its training cost, once
    assert [r.label for r in finals if r.on_curve] == ["scratch"]  # scratch at the target is a point of the curve
    table = markdown_table(finals)
    line = next(ln for ln in table.splitlines() if ln.startswith("| fast L0 |"))
    assert "2.000 |" in line and "†" not in line  # a level is not a miss of the target


def test_snapshots_report_an_ordinary_growth_run_s_earlier_stages_against_the_scratch_curve():
    from types import SimpleNamespace

    from nas_split.report import collect

    def run(label, method, stages):
        res = {"schema_version": 1, "command": "run", "method": method, "from_scratch": method == "scratch",
               "config": {"method": method}, "stages": stages, "status": "done", "wall_seconds": 5.0}
        return SimpleNamespace(label=label, seed=0, target_mmacs=4.0, phase="search",
                               config=SimpleNamespace(out="x")), res

    seed, grown = _stage(2.0, 0.62), _stage(4.0, 0.8)
    seed.update(kind="seed")
    grown.update(stage=1, growth={"new_neurons": 4})
    small = run("small", "scratch", [_stage(1.0, 0.5)])
    small[0].phase = "curve"
    pairs = [run("scratch", "scratch", [_stage(4.0, 0.7)]), small, run("fast", "fast", [seed, grown])]
    assert [r.label for r in collect(pairs)[1]] == ["scratch", "fast"]  # off by default
    by = {r.label: r for r in collect(pairs, snapshots=True)[1]}
    snap = by["fast S0"]
    assert (snap.family, snap.level, snap.mmacs, snap.test_acc) == ("fast", 0, 2.0, 0.62)
    assert snap.curve_acc == pytest.approx(0.6)  # (1, 0.5)-(4, 0.7) in log MACs at 2 MMACs, hand-derived
    assert snap.retrained_acc is None and "fast S1" not in by  # the last stage is the run's own row


def test_tensorboard_gets_every_level_per_epoch_and_per_stage(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nas_split.data import create_dataset
    from nas_split.runlog import RunWriter, Tags
    from nas_split.stages import StageRunner

    torch.manual_seed(0)
    data = create_dataset("digits", seed=0)
    model = search_spaces.create("test_mlp", 10, 1, 8)
    x = torch.stack([data.train[i][0] for i in range(8)])
    writer = RunWriter(tmp_path / "run", {"command": "test"})
    runner = StageRunner(data=data, recipe=TrainConfig(epochs=2, progress=False, seed=0), example_inputs=x,
                         latency=False, anytime=AnytimeConfig(), record=writer.stage, epoch_hook=writer.epoch)
    runner.stage(model, "seed", 2)
    add_channels(model, x[:2], {"features.1": NewChannels(4, torch.randn(4, 64) * 0.1)})
    runner.stage(model, "round", 2)
    writer.flush()
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    per_epoch = [e.value for e in events.Scalars(Tags.LEVEL_VAL_TOP1.format(0))]
    hist = runner.records[1].history
    assert per_epoch == pytest.approx([h["val_acc_levels"][0] for h in hist])  # the grown stage's two epochs
    stage_top1 = [e.value for e in events.Scalars(Tags.LEVEL_TOP1.format(1))]
    assert stage_top1 == pytest.approx([runner.records[1].extra["levels"][1]["test_acc"]])


GROW = ["--dataset", "digits", "--backbone", "mlp", "--width-mult", "0.125", "--epochs", "1", "--seed-epochs", "1",
        "--rounds", "2", "--no-progress", "--no-latency"]


def test_grow_an_anytime_family_and_deploy_a_level(tmp_path):
    import json

    import nas_split as ns
    from nas_split.checkpoints import latest_checkpoint
    from nas_split.cli import main

    out = tmp_path / "g"
    assert main(["grow", *GROW, "--method", "fast", "--out", str(out), "--set", "growth.anytime={optimizer: osgd}",
                 "--set", "growth.analysis_batches=2"]) == 0
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert [len(s["levels"]) for s in stages] == [1, 2, 3]
    macs = [lv["macs"] for lv in stages[-1]["levels"]]
    assert macs == sorted(macs) and macs[-1] == stages[-1]["cost"]["macs"]
    assert [lv["macs"] for lv in stages[-1]["levels"][:2]] == [s["cost"]["macs"] for s in stages[:2]]
    model = ns.load_grown(latest_checkpoint(out)[1])  # the levels travel with the checkpoint
    small = at.extract(model, 0)
    assert sum(p.numel() for p in small.parameters()) == stages[0]["cost"]["params"]
    # retrain a level: its architecture (the seed's widths), fresh weights; a level the model lacks is refused
    assert main(["retrain", str(out), "--level", "1", "--epochs", "1", "--no-progress", "--no-latency"]) == 0
    again = json.loads((tmp_path / "g-retrain-L1" / "results.json").read_text())["stages"]
    assert again[-1]["widths"] == stages[1]["widths"] and again[-1]["cost"]["macs"] == stages[1]["cost"]["macs"]
    assert again[-1]["level"] == 1
    assert main(["retrain", str(out), "--level", "3", "--epochs", "1", "--no-progress", "--no-latency"]) == 2
    assert not (tmp_path / "g-retrain-L3").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "prune-l1", "--target-mmacs", "0.01", "--set", "method_options={anytime: true}"],
     "method_options.anytime applies to growth methods, not to 'prune-l1'"),
    (["run", "--method", "fast", "--set", "method_options={anytime: {optimizer: adam}}"],
     "method_options.anytime of 'fast': config value optimizer='adam'"),
    (["nni", "--set", "growth.anytime={}"], "growth.anytime is not supported by nas-split nni"),
])
def test_anytime_is_refused_in_one_line_where_it_cannot_run(tmp_path, capsys, argv, message):
    from nas_split.cli import main

    assert main([*argv, *GROW[:8], "--out", str(tmp_path / "o"), "--no-latency"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
