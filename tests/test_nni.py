"""The NNI strategy on both engines, resume, export, ``compare --engine nni`` and bad input."""
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from nas_split.cli import main
from nas_split.config import NniRunConfig, load_config

GROW = ["dataset=digits", "backbone=mobilenetv1_cifar_025", "backbone_options.width_mult=0.125",
        "growth.method=s3d", "growth.rounds=2", "growth.seed_epochs=2", "train.epochs=1", "train.progress=false",
        "latency=false", "growth.analysis_batches=3"]


@pytest.fixture(scope="module", autouse=True)
def _nni_home(tmp_path_factory):
    """NNI writes its experiment manifest under $HOME/nni-experiments; keep it in a temporary directory."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    os.environ["HOME"] = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out, *extra):
    return load_config(NniRunConfig, None, [*GROW, f"out={out}", *extra])


def _stages(strategy):
    return [(h["stage"], h["default"], h["mmacs"], h["widths"]) for h in strategy.history]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    from nas_split.nni import run_nni

    cfg = _cfg(tmp_path_factory.mktemp("seq") / "run")
    t0 = time.time()
    exp, strategy = run_nni(cfg)
    seconds = time.time() - t0
    exp.stop()
    return cfg, exp, strategy, seconds


def test_sequential_s3d_export_rebuilds_and_reproduces_accuracy(sequential):
    from nas_split.data import create_dataset
    from nas_split.nni import BackboneSpace
    from nas_split.surgery import load_grown
    from nas_split.training import Trainer

    cfg, exp, strategy, seconds = sequential
    assert seconds < 120
    assert [h["stage"] for h in strategy.history] == [0, 1, 2]
    macs = [h["mmacs"] for h in strategy.history]
    assert macs[0] < macs[1] < macs[2]
    top = exp.export_top_models(top_k=3, formatter="dict")
    assert [t["stage"] for t in top] == [h["stage"] for h in sorted(strategy.history, key=lambda h: -h["default"])]
    data = create_dataset("digits", seed=0)
    _, _, test = data.loaders(64)
    for t in top:
        rec = next(h for h in strategy.history if h["stage"] == t["stage"])
        model = load_grown(t["checkpoint"])
        assert Trainer(cfg.train).evaluate(model, test).acc == pytest.approx(rec["default"], abs=1e-9)
        rebuilt = BackboneSpace(model.nas_split_spec, t["sizes"]).net  # widths alone rebuild the architecture
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}
        widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert t["widths"] == "-".join(map(str, widths))
    strategy.export_max_mmacs = macs[1]
    assert {t["stage"] for t in exp.export_top_models(top_k=3, formatter="dict")} == {0, 1}


def test_retrain_an_exported_stage_from_scratch(sequential, tmp_path, capsys):
    from nas_split.retrain import retrain
    from nas_split.surgery import layer_sizes, load_grown

    cfg, exp, strategy, _ = sequential
    (best,) = exp.export_top_models(top_k=1, formatter="dict")
    rec = next(h for h in strategy.history if h["stage"] == best["stage"])
    res = retrain(best, overrides=["train.progress=false", "latency=false"], out=str(tmp_path / "py"))
    (st,) = res["stages"]
    epochs = cfg.growth.seed_epochs + best["stage"] * cfg.train.epochs  # what the stage had trained in all
    assert st["kind"] == "retrain" and st["epochs"] == epochs and res["config"]["dataset"] == "digits"
    assert st["cost"]["macs"] == rec["macs"]
    model = load_grown(tmp_path / "py" / "model.pt")
    assert layer_sizes(model) == best["sizes"]
    searched = load_grown(best["checkpoint"])
    assert not torch.equal(model.conv_stem.weight, searched.conv_stem.weight)  # fresh weights
    # the CLI on the stage's file gives the same run (same seed, same recipe)
    assert main(["retrain", best["checkpoint"], "--out", str(tmp_path / "cli"), "--no-progress", "--no-latency"]) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert cli["stages"][0]["test_acc"] == st["test_acc"] and cli["stages"][0]["widths"] == st["widths"]


def test_ts_engine_web_ui_rest_and_same_stages_as_sequential(tmp_path, sequential, monkeypatch):
    from nas_split.nni import build_experiment

    monkeypatch.chdir(tmp_path)  # trials find nas_split wherever the experiment is started

    port = _free_port()
    exp, strategy = build_experiment(_cfg(tmp_path / "run", "engine=ts", f"port={port}"))
    try:
        exp.run(port=port)

        def rest(ep):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{ep}", timeout=10) as r:
                return json.loads(r.read())

        assert rest("check-status")["status"] == "DONE"
        trials = rest("trial-jobs")
        assert len(trials) == 3 and {t["status"] for t in trials} == {"SUCCEEDED"}
        reported = sorted((json.loads(json.loads(t["finalMetricData"][0]["data"])) for t in trials),
                          key=lambda m: m["stage"])
        for m, h in zip(reported, strategy.history, strict=True):
            assert (m["stage"], m["default"], m["mmacs"], m["widths"]) == (h["stage"], h["default"], h["mmacs"],
                                                                          h["widths"])
            assert {"params", "energy_uj_est"} <= set(m)
        trial_dirs = list(Path(exp.config.experiment_working_directory, exp.id).glob("environments/*/trials/*"))
        assert any((d / "tensorboard" / "results.json").is_file() for d in trial_dirs)
    finally:
        exp.stop()
    # a finished experiment is served again by rebuilding it with its id (what `nas-split nni --view` does)
    viewer, _ = build_experiment(_cfg(tmp_path / "run", "engine=ts", f"port={port}"), exp_id=exp.id, check=False)
    viewer.view(port, non_blocking=True)
    try:
        assert len(rest("trial-jobs")) == 3
    finally:
        viewer.stop()
    # warm start from checkpoints in trial processes gives exactly the live model's stages
    assert _stages(strategy) == _stages(sequential[2])
    with pytest.raises(OSError):  # the manager is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and exp.id.encode() in
            _cmdline(p)]
    assert not left


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_resume_after_stage_1_ends_with_the_same_widths(tmp_path, sequential):
    from nas_split.nni import build_experiment

    cfg = _cfg(tmp_path / "run")
    exp, strategy = build_experiment(cfg)
    exp.config.max_trial_number = 2  # the experiment stops after stage 1
    exp.run()
    exp.stop()
    assert [h["stage"] for h in strategy.history] == [0, 1]
    again, resumed = build_experiment(cfg, exp_id=exp.id, check=False)
    again.resume()
    again.stop()
    assert resumed is not strategy and [h["stage"] for h in resumed.history] == [0, 1, 2]
    assert _stages(resumed) == _stages(sequential[2])


def test_vt_stages_carry_their_learning_rate_slices(tmp_path):
    """The NNI evaluator with ``vt`` growth: each stage's checkpoint holds the method's state (the round that added
    each channel), and the next stage continues it."""
    import search_spaces
    from nas_split.nni import train_stage
    from nas_split.surgery.export import load_grown

    run = {"dataset": "digits", "dataset_options": {}, "data_dir": None, "seed_epochs": 1, "latency": False,
           "cost_model": "horowitz-45nm", "train": {"epochs": 1, "progress": False}}
    net = search_spaces.create("test_mobilenetv1", num_classes=10, in_chans=1, input_size=8)
    train_stage(net, run, 0, checkpoint=str(tmp_path / "s0.pt"))
    labels = {}
    for k in (1, 2):
        net = load_grown(tmp_path / f"s{k - 1}.pt")
        train_stage(net, run, k, checkpoint=str(tmp_path / f"s{k}.pt"), growth={"method": "vt"},
                    previous=str(tmp_path / f"s{k - 1}.pt"))
        labels[k] = torch.load(tmp_path / f"s{k}.pt", weights_only=True)["stages"]
    widths = {k: {n: m.out_channels for n, m in load_grown(tmp_path / f"s{k}.pt").named_modules()
                  if n in labels[1]} for k in (0, 1, 2)}
    for layer in labels[1]:
        w0, w1, w2 = (widths[k][layer] for k in (0, 1, 2))
        assert labels[1][layer] == [0] * w0 + [1] * (w1 - w0)
        assert labels[2][layer] == labels[1][layer] + [2] * (w2 - w1) and w2 > w1 > w0


def test_compare_on_nni_runs_trials_in_parallel_with_the_same_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "c"
    argv = ["compare", "--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--set",
            "backbone_options.width_mult=0.25", "--seed-width-mult", "0.125", "--target-mmacs", "3", "--epochs", "1",
            "--seed-epochs", "1", "--rounds", "1", "--no-latency", "--methods", "random,scratch", "--seeds", "0,1",
            "--out", str(out)]
    assert main([*argv, "--engine", "nni", "--jobs", "2", "--port", str(_free_port())]) == 0
    trials = json.loads((out / "nni_trials.json").read_text())
    assert len(trials) == 4 and {t["status"] for t in trials} == {"SUCCEEDED"}
    spans = sorted((t["startTime"], t["endTime"]) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # two ran at once
    nni_table = (out / "table.md").read_text()
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "plain")]) == 0  # same threads per run
    plain = (tmp_path / "plain" / "table.md").read_text()
    assert [ln.split("|")[1:4] for ln in nni_table.splitlines() if ln.startswith("| ")] == \
        [ln.split("|")[1:4] for ln in plain.splitlines() if ln.startswith("| ")]


def test_bad_input_refused_before_the_experiment(tmp_path, capsys):
    from nas_split.nni import BackboneSpace, SplittingDescent, check_experiment, stage_evaluator
    from nas_split.surgery import NotGrowableError

    base = ["nni", "--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--width-mult", "0.125"]
    assert main([*base, "--target-mmacs", "1", "--out", str(tmp_path / "a")]) == 2
    assert "not above the seed" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main([*base, "--engine", "ts", "--port", str(port), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port} is in use" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    linear = BackboneSpace({"factory": "search_spaces.mlp:MLP", "kwargs": {"num_classes": 10, "in_features": 64,
                                                                        "widths": []}})
    with pytest.raises(NotGrowableError, match="no growable layer"):
        check_experiment(linear, stage_evaluator("digits"), SplittingDescent())
