"""The one stage checkpoint (``nas_split.checkpoints``): ``grow`` and both NNI engines write one layout; runs of
the older layouts (``tests/data/old_layouts``, written by the code before this module) still resume and retrain,
and give the records the old code gave."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from nas_split.checkpoints import load_stage, restore_optimizer, resume_point, save_stage, stage_path
from nas_split.cli import main
from nas_split.errors import RunFileError

OLD = Path(__file__).parent / "data" / "old_layouts"
EXPECTED = json.loads((OLD / "expected.json").read_text())
TINY = ["dataset=digits", "backbone=test_mobilenetv1", "growth.method=fast", "growth.rounds=2",
        "growth.seed_epochs=1", "train.epochs=1", "train.progress=false", "latency=false", "train.seed=0",
        "growth.analysis_batches=2"]
_spec = importlib.util.spec_from_file_location("fingerprint", Path(__file__).parent / "golden" / "fingerprint.py")
fingerprint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fingerprint)


def _stages(run_dir: Path) -> list[dict]:
    return [fingerprint._stage(s) for s in json.loads((run_dir / "results.json").read_text())["stages"]]


def _nni(history: list[dict]) -> list[dict]:
    return [{k: h[k] for k in ("stage", "default", "macs", "mmacs", "widths", "new_neurons")} for h in history]


def test_an_old_grow_checkpoint_resumes_and_retrains(tmp_path, capsys, two_threads):
    run = shutil.copytree(OLD / "grow", tmp_path / "grow")
    assert main(["retrain", str(run), "--out", str(tmp_path / "retrain"), "--no-progress", "--no-latency"]) == 0
    assert _stages(tmp_path / "retrain") == EXPECTED["retrain_grow"]
    assert main(["grow", "--resume", str(run), "--no-progress"]) == 0
    assert _stages(run) == EXPECTED["grow"]  # stage 2 as the uninterrupted run of the old code
    ckpt = load_stage(stage_path(run / "checkpoints", 2))  # the new stage: the same layout
    assert ckpt.stage == 2 and len(ckpt.records) == 3 and set(ckpt.method_state) == {"spectra", "stages"}


def test_an_old_nni_stage_reads_as_a_stage_and_retrains(tmp_path, capsys, two_threads):
    old = load_stage(OLD / "nni" / "checkpoints" / "stage1.pt")
    assert old.results is None and old.stage is None and old.epochs_total == 2
    assert old.config["dataset"] == "digits" and old.optimizer is not None and old.method_state["spectra"]
    assert main(["retrain", str(OLD / "nni" / "checkpoints" / "stage1.pt"), "--out", str(tmp_path / "r"),
                 "--no-progress", "--no-latency"]) == 0
    assert _stages(tmp_path / "r") == EXPECTED["retrain_nni"]


def test_an_old_nni_run_resumes_into_the_one_layout(tmp_path, monkeypatch, two_threads):
    """The strategy's history of an old run (stages 0 and 1; stage 1 a model file with ``.state.pt`` beside it)
    continues with stage 2, which is the old code's uninterrupted stage 2, saved in the one layout."""
    from nas_split.config import NniRunConfig, load_config
    from nas_split.nni import build_experiment

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NNI writes a manifest under $HOME
    old = shutil.copytree(OLD / "nni", tmp_path / "old")
    history = json.loads((old / "checkpoints" / "history.json").read_text())["history"]
    for h in history:  # the run directory moved: its stage files are found by name
        h["checkpoint"] = str(old / "checkpoints" / Path(h["checkpoint"]).name)
    cfg = load_config(NniRunConfig, None, [*TINY, f"out={tmp_path / 'new'}"])
    exp, strategy = build_experiment(cfg)
    strategy.load_state_dict({"history": history})
    exp.run()
    exp.stop()
    assert _nni(strategy.history) == EXPECTED["nni"]
    point = resume_point(tmp_path / "new")  # an NNI run directory reads as grow's: checkpoints/stage{k}.pt
    assert point.stage == 2 and point.checkpoint.path == Path(strategy.history[2]["checkpoint"])
    assert point.checkpoint.optimizer is not None and point.checkpoint.method_state["spectra"]
    assert [r.stage for r in point.checkpoint.records] == [0, 1, 2]  # stages 0, 1: only their epochs are known
    assert point.checkpoint.epochs_total == 3 and point.checkpoint.config["dataset"] == "digits"
    assert not list((tmp_path / "new").rglob("*.state.pt"))


def test_save_and_load_a_stage(tmp_path):
    import search_spaces
    from nas_split.records import RunResult
    from nas_split.training import TrainConfig, make_optimizer

    model = search_spaces.create("test_mobilenetv1", num_classes=10, in_chans=1, input_size=8)
    opt = make_optimizer(model, TrainConfig(lr=0.3))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    res = json.loads(json.dumps(RunResult("grow", "running", {"dataset": "digits"}, []).to_dict()))
    save_stage(tmp_path / "s.pt", 0, model, opt, res, {"spectra": {}})
    with pytest.raises(RunFileError, match="records do not match its stage"):
        load_stage(tmp_path / "s.pt")
    res["stages"] = [{"stage": 0, "kind": "seed", "epochs": 1, "epochs_total": 1, "test_acc": 0.5, "test_loss": 1.0,
                      "val_acc": None, "train_seconds": 0.0, "history": [], "cost": {}, "widths": {}}]
    path = save_stage(tmp_path / "s.pt", 0, model, opt, res, {"spectra": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]  # written atomically, nothing left beside
    ckpt = load_stage(path)
    assert (ckpt.stage, ckpt.epochs_total, ckpt.config, ckpt.method_state) == (0, 1, {"dataset": "digits"},
                                                                              {"spectra": {}})
    again = restore_optimizer(model, TrainConfig(lr=0.05), ckpt.optimizer)  # a changed recipe applies from here
    assert again.param_groups[0]["lr"] == 0.05 and restore_optimizer(model, TrainConfig(), None) is None
    assert all(torch.equal(again.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
               for p in model.parameters() if p in opt.state)
    torch.save({"stage": 0, "model": {}}, tmp_path / "bad.pt")
    with pytest.raises(RunFileError, match="missing optimizer, results"):
        load_stage(tmp_path / "bad.pt")
