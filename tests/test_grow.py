"""``nas-split grow``: growth rounds, resume after a kill, bad input, failed rounds."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nas_split.checkpoints import latest_checkpoint
from nas_split.cli import main

FAST = ["--dataset", "digits", "--backbone", "test_mobilenetv1", "--epochs", "1", "--seed-epochs", "2",
        "--rounds", "3", "--method", "fast", "--set", "growth.analysis_batches=3", "--set", "growth.fast_passes=1",
        "--no-progress", "--no-latency"]


def _results(d):
    return json.loads((d / "results.json").read_text())


def _widths(res):
    return [s["widths"] for s in res["stages"]]


def test_grow_rounds_increase_macs_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["grow", *FAST, "--out", str(out), "--set", "growth.method=s3d"]) == 0
    res = _results(out)
    assert res["status"] == "done" and res["command"] == "grow" and len(res["stages"]) == 4
    macs = [s["cost"]["macs"] for s in res["stages"]]
    assert all(b > a for a, b in zip(macs, macs[1:], strict=False))  # MACs grow every round
    for s in res["stages"][1:]:
        g = s["growth"]
        # S3D's schemes, S2D's two copies among them (within every mass budget; ranked by gain per new neuron)
        assert g["new_neurons"] > 0 and set(g["schemes"]) <= {"s2d", "s3d-min", "s3d-max", "s3d-both"}
        assert s["analysis_seconds"] > 0 and s["train_seconds"] > 0 and g["lambda"]
        widths_before = res["stages"][s["stage"] - 1]["widths"]
        grown = sum(s["widths"][k] - widths_before[k] for k in widths_before if "conv_pw" in k or k == "conv_stem")
        assert grown == g["new_neurons"]
    assert latest_checkpoint(out)[0] == 3
    ckpt = torch.load(out / "checkpoints" / "stage3.pt", weights_only=True)
    from nas_split.surgery.export import build_grown

    model = build_grown(ckpt["model"])
    assert model.conv_stem.out_channels == res["stages"][-1]["widths"]["conv_stem"]


def test_grow_runs_vt_and_keeps_its_learning_rate_slices(tmp_path):
    """``grow`` with a growth method other than splitting: ``vt`` adds neurons in pairs, and its learning-rate
    slices (one label per channel: the round that added it) are saved with every stage."""
    out = tmp_path / "vt"
    args = ["--dataset", "digits", "--backbone", "test_mobilenetv1", "--epochs", "1", "--seed-epochs", "1",
            "--rounds", "1", "--method", "vt", "--no-progress", "--no-latency", "--out", str(out)]
    assert main(["grow", *args]) == 0
    res = _results(out)
    g = res["stages"][1]["growth"]
    assert g["new_neurons"] > 0 and g["variance_transfer"] and g["lra"]
    ckpt = torch.load(out / "checkpoints" / "stage1.pt", weights_only=True)
    before, after = res["stages"][0]["widths"], res["stages"][1]["widths"]
    for layer, labels in ckpt["stages"].items():
        added = after[layer] - before[layer]
        assert added % 2 == 0 and labels == [0] * before[layer] + [1] * added


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nas_split.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_kill_in_round_2_gives_the_same_widths(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(["grow", *FAST, "--out", str(ref)]) == 0
    proc = _cli("grow", *FAST, "--out", str(killed))
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "stage1.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # during round 2
    proc.wait()
    assert latest_checkpoint(killed)[0] == 1 and _results(killed)["status"] == "running"
    assert main(["grow", "--resume", str(killed), "--no-progress"]) == 0
    a, b = _results(ref), _results(killed)
    assert b["status"] == "done" and [s["stage"] for s in b["stages"]] == [0, 1, 2, 3]
    assert _widths(a) == _widths(b)
    assert [s["test_acc"] for s in a["stages"]] == pytest.approx([s["test_acc"] for s in b["stages"]], abs=1e-6)


def test_failed_round_keeps_last_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    from nas_split.grower import Grower

    out = tmp_path / "run"
    real = Grower.step
    calls = {"n": 0}

    def flaky(self, loader):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("loss is nan during splitting analysis")
        return real(self, loader)

    monkeypatch.setattr(Grower, "step", flaky)
    assert main(["grow", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan" in err[0] and "--resume" in err[0]
    assert latest_checkpoint(out)[0] == 1
    res = _results(out)
    assert res["status"] == "failed" and len(res["stages"]) == 2
    monkeypatch.setattr(Grower, "step", real)
    assert main(["grow", "--resume", str(out), "--no-progress"]) == 0
    assert _results(out)["status"] == "done" and len(_results(out)["stages"]) == 4


@pytest.mark.parametrize("argv, message", [
    (["--method", "s4d"], "config value growth.method='s4d'"),
    (["--set", "growth.c=0.5"], "config value growth.c=0.5"),
    (["--eps", "0"], "config value growth.eps=0"),
    (["--target-mmacs", "0.001"], "not above the seed's"),
    (["--backbone", "user_linear_only"], "no growable layer"),
    (["--resume", "/no/such/run"], "no results.json"),
    (["--method", "vt"], "growth.analysis_batches applies to the splitting methods"),
    (["--method", "prune-l1"], "not a growth method"),
])
def test_grow_bad_input_exits_2(tmp_path, capsys, argv, message):
    from torch import nn

    import search_spaces
    from search_spaces._registry import _SPACES

    search_spaces.register("user_linear_only")(
        lambda num_classes, in_chans, input_size=None: nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)))
    out = tmp_path / "run"
    try:
        args = ["grow", "--resume", argv[1]] if argv[0] == "--resume" else ["grow", *FAST, "--out", str(out), *argv]
        assert main(args) == 2
    finally:
        _SPACES.pop("user_linear_only")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not (out / "checkpoints").exists()
