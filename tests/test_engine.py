"""One growth engine: ``grow``, ``run --method fast`` and the NNI strategy (sequential engine) give the same stages
on the same config, seed and schedule; the schedule's caps are the geometric ones; NNI carries the optimizer."""
import json

import pytest
import torch

from nas_split.cli import main
from nas_split.cost import count_macs
from nas_split.engine import round_cap

COMMON = ["--dataset", "digits", "--backbone", "test_mobilenetv1", "--epochs", "1", "--seed-epochs", "1",
          "--rounds", "2", "--no-progress", "--no-latency"]
FAST = ["analysis_batches=2", "fast_passes=1"]


def _stages(res):
    return [(s["widths"], s["cost"]["macs"]) for s in res["stages"]]


@pytest.fixture(scope="module")
def target():
    import search_spaces

    seed = search_spaces.create("test_mobilenetv1", num_classes=10, in_chans=1, input_size=8)
    return round(1.9 * count_macs(seed, torch.randn(1, 1, 8, 8))[0] / 1e6, 4)


def test_round_cap_is_geometric_and_lands_on_the_target():
    caps = [round_cap(2e6, 8e6, r, 2) for r in (0, 1, 2)]
    assert caps == pytest.approx([2e6, 4e6, 8e6])
    assert round_cap(2e6, None, 1, 2) is None


def test_grow_run_and_nni_give_the_same_stages(tmp_path, target, monkeypatch):
    from nas_split.config import NniRunConfig, load_config
    from nas_split.nni import run_nni

    assert main(["grow", *COMMON, "--method", "fast", "--target-mmacs", str(target), "--out", str(tmp_path / "g"),
                 *[a for kv in FAST for a in ("--set", f"growth.{kv}")]]) == 0
    assert main(["run", *COMMON, "--method", "fast", "--target-mmacs", str(target), "--set", "seed_options={}",
                 "--out", str(tmp_path / "r"), *[a for kv in FAST for a in ("--set", f"method_options.{kv}")]]) == 0
    grow = json.loads((tmp_path / "g" / "results.json").read_text())
    run = json.loads((tmp_path / "r" / "results.json").read_text())
    assert len(grow["stages"]) == 3 and _stages(grow) == _stages(run)
    assert [s["test_acc"] for s in grow["stages"]] == [s["test_acc"] for s in run["stages"]]
    macs = [m for _, m in _stages(grow)]
    for r in (1, 2):  # every round lands under its geometric cap, the last near the target
        assert macs[r] <= round_cap(macs[0], target * 1e6, r, 2)
    assert macs[2] >= 0.9 * target * 1e6

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # NNI writes a manifest under $HOME
    cfg = load_config(NniRunConfig, None, ["dataset=digits", "backbone=test_mobilenetv1", "growth.method=fast",
                                           "growth.rounds=2", "growth.seed_epochs=1", "train.epochs=1",
                                           "train.progress=false", "latency=false", f"growth.target_mmacs={target}",
                                           *[f"growth.{kv}" for kv in FAST], f"out={tmp_path / 'n'}"])
    exp, strategy = run_nni(cfg)
    exp.stop()
    nni = [h["macs"] for h in strategy.history]
    assert nni == macs
    assert [h["default"] for h in strategy.history] == [s["test_acc"] for s in grow["stages"]]
    widths = ["-".join(str(w) for w in list(s["widths"].values())[:-1]) for s in grow["stages"]]
    assert [h["widths"] for h in strategy.history] == widths
    # NNI carried the optimizer across stages: each stage's checkpoint holds momentum for every parameter
    state = torch.load(strategy.history[1]["checkpoint"], weights_only=True)
    assert state["optimizer"] is not None and len(state["optimizer"]["state"]) > 0 and state["spectra"]
