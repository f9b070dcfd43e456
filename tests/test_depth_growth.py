"""Depth growth as a method option (``growth.depth``, ``method_options.depth``): one round's depth step, the
optimizer carrying the new blocks (and restoring after a reload), the records and TensorBoard, retraining and
scratch at a depth profile, the widths figure, and the combinations refused in one line."""
import json

import pytest
import torch
import torch.nn.functional as F

import nas_split as ns
import search_spaces
from nas_split.checkpoints import restore_optimizer
from nas_split.cli import main
from nas_split.cost import count_macs
from nas_split.growth.depth_scores import depth_candidates, grow_depth
from nas_split.surgery.blocks import DEPTH_KEYS
from nas_split.training import TrainConfig, make_optimizer

SEED_BLOCKS = 8  # test_mobilenetv2: blocks per stage [1, 1, 2, 1, 1, 1, 1]


def _seed(dtype=torch.float64):
    torch.manual_seed(0)
    model = search_spaces.create("test_mobilenetv2", 10, 3, 16).to(dtype)
    return model, torch.randn(16, 3, 16, 16, dtype=dtype)


def _loader(x, n=3):
    g = torch.Generator().manual_seed(1)
    return [(x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randint(0, 10, (len(x),), generator=g))
            for _ in range(n)]


def _step(model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def test_a_depth_step_keeps_the_function_fits_its_cap_and_ranks_by_gain_per_mac():
    model, x = _seed()
    loader = _loader(x)
    cands = depth_candidates(model, loader, steps=3, seed=5)
    # every block starts as the identity and descends from there: each site lowers the loss to first order
    assert len(cands) >= 2 and all(c.score < 0 for c in cands), [c.score for c in cands]
    negative = sorted(cands, key=lambda c: c.score / c.macs)
    before = model.eval()(x).detach()
    macs = count_macs(model, x)[0]
    # a cap with room for the best block and not for the best two (each block's MACs from its candidate)
    cap = macs + negative[0].macs + negative[1].macs - 1
    step = grow_depth(model, x, loader, max_blocks=3, max_macs=cap, steps=3, seed=5)
    best = negative[0].site
    assert step.sites == [f"{best.container}:{best.after}"]  # gain per MAC first, cut at the cap
    assert step.scores == {f"{c.site.container}:{c.site.after}": c.score for c in cands}  # same seed, same scores
    assert count_macs(model, x)[0] == macs + negative[0].macs <= cap
    assert torch.allclose(model.eval()(x), before, atol=1e-10)  # residual block: x + 0
    assert step.blocks == [f"{best.container}.{best.after + 1}"]
    assert sum(len(s) for s in model.blocks) == SEED_BLOCKS + 1


def test_max_blocks_bounds_a_round_and_nothing_goes_in_without_room():
    model, x = _seed()
    loader = _loader(x)
    macs = count_macs(model, x)[0]
    assert grow_depth(model, x, loader, max_blocks=5, max_macs=macs, steps=3).blocks == []  # no room
    assert count_macs(model, x)[0] == macs
    step = grow_depth(model, x, loader, max_blocks=2, max_macs=None, steps=3)
    assert len(step.blocks) == 2 and sum(len(s) for s in model.blocks) == SEED_BLOCKS + 2


def test_new_blocks_join_the_optimizer_and_its_state_restores_onto_the_reloaded_model(tmp_path):
    model, x = _seed(torch.float32)
    loader = _loader(x)
    recipe = TrainConfig(lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt = make_optimizer(model, recipe)
    _step(model.train(), opt, loader[0])
    step = grow_depth(model, x, loader, max_blocks=2, optimizer=opt, steps=3)
    assert step.blocks
    _step(model.train(), opt, loader[1])
    held = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, held)) == sorted(id(p) for p in model.parameters())  # each parameter once
    new = {id(p) for n in step.blocks for p in model.get_submodule(n).parameters()}
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert all((id(p) in decay) == (p.dim() > 1) for n in step.blocks for p in model.get_submodule(n).parameters())
    assert all("momentum_buffer" in opt.state[p] for p in held if id(p) in new)  # they trained
    ns.save_grown(model, tmp_path / "m.pt")
    reloaded = ns.load_grown(tmp_path / "m.pt")
    restored = restore_optimizer(reloaded, recipe, opt.state_dict())
    names = {id(p): n for n, p in model.named_parameters()}
    again = dict(reloaded.named_parameters())
    for p in held:
        q = again[names[id(p)]]
        assert torch.equal(restored.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"]), names[id(p)]


RUN = ["--dataset", "digits", "--backbone", "test_mobilenetv2", "--epochs", "1", "--seed-epochs", "1",
       "--rounds", "2", "--no-progress", "--no-latency", "--set", "train.batch_size=64", "--set", "seed_options={}"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fast", "firefly"])
def test_a_run_grows_in_depth_records_it_and_retrains_the_same_architecture(tmp_path, method):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / method
    opts = "{depth: true, max_blocks_per_stage: 2" + (", analysis_batches: 2, fast_passes: 1}" if method == "fast"
                                                      else ", steps: 5}")
    assert main(["run", *RUN, "--method", method, "--target-mmacs", "1.6", "--set", f"method_options={opts}",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    stages = res["stages"]
    added = [len(s["growth"]["depth"]["blocks"]) for s in stages[1:]]
    assert all(0 <= a <= 2 for a in added) and sum(added) >= 1, added
    depths = stages[-1]["depth"]["stage_depths"]
    assert sum(depths) == SEED_BLOCKS + sum(added)
    for s in stages[1:]:  # the record names the new blocks' layers among its widths, and stays under the cap
        for block in s["growth"]["depth"]["blocks"]:
            assert any(k.startswith(f"{block}.") for k in s["widths"]), block
    assert stages[-1]["cost"]["mmacs"] <= 1.6 * (1 + 1e-9)
    acc = EventAccumulator(str(out)).Reload()
    layers = [e.value for e in acc.Scalars("arch/layers")]
    assert layers == [len(s["widths"]) for s in stages]
    assert [e.value for e in acc.Scalars("arch/stage3/blocks")][-1] == depths[3]
    retrained = tmp_path / "retrain"
    assert main(["retrain", str(out), "--epochs", "1", "--no-progress", "--no-latency", "--out", str(retrained)]) == 0
    r = json.loads((retrained / "results.json").read_text())["stages"][-1]
    assert r["widths"] == stages[-1]["widths"] and r["depth"]["stage_depths"] == depths


@pytest.mark.slow
def test_nni_stages_grow_in_depth_resume_and_rebuild_as_a_ts_trial_does(tmp_path, monkeypatch):
    """``nas-split nni`` with ``growth.depth``: the history records each stage's depth; a stage rebuilt as a ``ts``
    trial rebuilds it (:class:`~nas_split.nni.BackboneSpace` with the previous stage's sizes and depth) continues to
    the same next stage as the live network; a resumed experiment ends where an uninterrupted one does."""
    from nas_split.config import NniRunConfig, load_config
    from nas_split.nni import BackboneSpace, build_experiment, run_nni, train_stage

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NNI's experiment manifest
    argv = ["dataset=digits", "backbone=test_mobilenetv2", "growth.method=fast", "growth.depth=true",
            "growth.max_blocks_per_stage=2", "growth.analysis_batches=2", "growth.fast_passes=1", "growth.rounds=2",
            "growth.seed_epochs=1", "growth.target_mmacs=1.6", "train.epochs=1", "train.progress=false",
            "latency=false"]
    cfg = load_config(NniRunConfig, None, [*argv, f"out={tmp_path / 'seq'}"])
    exp, strategy = run_nni(cfg)
    exp.stop()
    h = strategy.history
    assert [s["stage"] for s in h] == [0, 1, 2] and "stage_depths" not in h[0]["depth"]
    assert sum(h[1]["depth"]["stage_depths"]) > SEED_BLOCKS, h[1]["depth"]  # stage 1 deepened: what is rebuilt
    added = sum(h[-1]["depth"]["stage_depths"]) - SEED_BLOCKS
    assert added >= 1, h[-1]["depth"]
    final = ns.load_grown(h[-1]["checkpoint"])
    assert [len(s) for s in final.blocks] == h[-1]["depth"]["stage_depths"]
    assert h[-1]["mmacs"] <= 1.6 * (1 + 1e-9)

    # stage 2 as a ts trial runs it: the network rebuilt from stage 1's spec, sizes and depth, in a fresh object
    seed_spec = {k: v for k, v in final.nas_split_spec.items() if k not in DEPTH_KEYS}
    run = strategy.model_space.evaluator.arguments["run"]
    g = strategy.growth.model_dump()
    rebuilt = BackboneSpace(seed_spec, h[1]["sizes"], h[1]["depth"])
    assert rebuilt.trace_kwargs["depth"] == h[1]["depth"]  # what NNI serialises for a ts trial to rebuild it
    again = train_stage(rebuilt, run, stage=2, checkpoint=str(tmp_path / "trial2.pt"), previous=h[1]["checkpoint"],
                        growth=g, max_macs=1.6e6)
    assert (again["default"], again["mmacs"], again["widths"]) == (h[2]["default"], h[2]["mmacs"], h[2]["widths"])

    # a resumed experiment (stopped after stage 1) replays the depth on the live network and ends the same
    cfg2 = load_config(NniRunConfig, None, [*argv, f"out={tmp_path / 'resumed'}"])
    first, _ = build_experiment(cfg2)
    first.config.max_trial_number = 2
    first.run()
    first.stop()
    resumed_exp, resumed = build_experiment(cfg2, exp_id=first.id, check=False)
    resumed_exp.resume()
    resumed_exp.stop()
    assert [(s["stage"], s["default"], s["mmacs"], s["widths"], s["depth"]) for s in resumed.history] == \
        [(s["stage"], s["default"], s["mmacs"], s["widths"], s["depth"]) for s in h]


def test_scratch_and_random_arch_build_a_given_depth_profile(tmp_path):
    from nas_split.config import MethodRunConfig
    from nas_split.experiment import method_context, prepare

    deep = [1, 3, 1, 2, 1]  # mobilenetv1_cifar_025's default: [1, 2, 2, 6, 2]
    for method, opts in (("scratch", {"depths": deep}), ("random-arch", {"depths": deep})):
        cfg = MethodRunConfig(dataset="digits", backbone="mobilenetv1_cifar_025", method=method, method_options=opts,
                              target_mmacs=0.5, seed_options={"width_mult": 0.25, "depths": [1, 1, 1, 1, 1]},
                              out=str(tmp_path / method))
        p = prepare(cfg)
        ctx, m = method_context(cfg, p)
        model, extra = m.architecture(ctx)
        assert [len(s) for s in model.blocks] == deep and extra["depths"] == deep
        assert abs(count_macs(model, p.example_inputs)[0] / 0.5e6 - 1) < 0.15


@pytest.mark.parametrize("argv, message", [
    (["grow", "--method", "vt", "--set", "growth.depth=true"],
     "growth.depth applies to firefly and the splitting methods"),
    (["grow", "--method", "fast", "--set", "growth.depth=true", "--set", "growth.lra=true"], "growth.depth with lra"),
    (["grow", "--method", "fast", "--set", "growth.depth=true", "--set", "growth.anytime={}"],
     "growth.depth with anytime"),
    (["grow", "--method", "fast", "--set", "growth.max_blocks_per_stage=2"],
     "growth.max_blocks_per_stage applies with growth.depth: true"),
    (["run", "--method", "fast", "--set", "method_options={depth: true, layers: [conv_stem]}"],
     "method_options.depth with layers"),
    (["run", "--method", "gradmax", "--set", "method_options={depth: true}"],
     "method_options.depth applies to firefly and the splitting methods"),
    (["run", "--method", "fast", "--set", "method_options={depth: 2}"], "method_options.depth of 'fast' is true"),
    (["run", "--method", "fast", "--set", "method_options={depth: true, max_blocks_per_stage: 0}"],
     "max_blocks_per_stage of 'fast' is a positive integer"),
    (["run", "--method", "scratch", "--target-mmacs", "0.5", "--set", "method_options={depths: [1, 0]}"],
     "scratch: depths lists positive block counts"),
])
def test_depth_options_are_refused_in_one_line_where_they_cannot_apply(tmp_path, capsys, argv, message):
    base = ["--dataset", "digits", "--backbone", "test_mobilenetv2", "--epochs", "1", "--no-progress",
            "--no-latency", "--out", str(tmp_path / "o")]
    assert main([*argv, *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_the_widths_figure_draws_each_run_when_depths_differ():
    from nas_split.report import Row
    from nas_split.report_files import widths_figure

    def row(label, seed, n):
        return Row(label, seed, 1.0, 0.9, 1.0, 1.0, 1.0, 0.0, 1, {f"l{i}": 8 + i for i in range(n)})

    fig = widths_figure([row("deep", 0, 6), row("deep", 1, 8), row("wide", 0, 5), row("wide", 1, 5)])
    lines = fig.axes[0].get_lines()
    assert sorted(len(line.get_xdata()) for line in lines) == [4, 5, 7]  # deep: one line per run; wide: the mean
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == ["deep (6/8 layers)",
                                                                                    "wide (5 layers)"]


def test_the_harness_keys_are_not_the_method_s_and_scratch_at_another_depth_is_off_the_curve(tmp_path):
    from nas_split.methods import split_options, trains_from_scratch
    from nas_split.report import on_scratch_curve
    from nas_split.retrain import retrain_config

    own, harness = split_options({"depth": True, "steps": 5, "anytime": {}, "max_blocks_per_stage": 2})
    assert own == {"steps": 5} and harness == {"depth": True, "anytime": {}, "max_blocks_per_stage": 2}
    assert not trains_from_scratch("firefly", {"depth": True, "steps": 5})  # compare's retrain phase asks this
    assert trains_from_scratch("scratch", {"depths": [1, 1, 1, 1, 1]})
    assert on_scratch_curve({"method": "scratch", "method_options": {}})
    assert not on_scratch_curve({"method": "scratch", "method_options": {"depths": [1, 1, 1, 1, 1]}})
    with pytest.raises(ns.errors.ConfigError, match="--level is a level's index"):
        retrain_config(tmp_path / "missing", level=-1)
