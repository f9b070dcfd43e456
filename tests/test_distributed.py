"""Growth across processes (gloo, CPU): 2 processes x batch B against 1 process x batch 2B on the same data order.

The model has no batch norm, so the two set-ups compute the same thing and differ only by the order of float
reductions: decisions (widths after each round, the final weights) must be identical, the recorded λ statistics
equal to 1e-5 relative, the test accuracy equal.  The comparison trains in float64 (Fabric's ``64-true``): in
float32 the λ statistics agree to ~1e-6 but the fast method's least converged estimate (the smallest λ_max of a
layer after a round of training) was measured 3e-5 apart, RMSprop amplifying the 1e-7 reduction-order noise of
its near-zero Rayleigh-quotient gradients.  One comparison covers every method that decides from data
(fast, exact S2D, S3D, Firefly, GradMax, Taylor pruning), one run per process launch to keep the test short.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nas_split.cli import main

pytestmark = pytest.mark.slow  # each test launches 2-process runs

CLI = [str(Path(sys.executable).parent / "nas-split")]  # Fabric's launcher re-runs this command per process
DDP = ["--set", "train.devices=2", "--set", "train.strategy=ddp", "--set", "train.batch_size=32"]
BASE = {"dataset": "digits", "backbone": "mlp", "backbone_options": {"width_mult": 0.25, "norm": False, "act": "tanh"},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "accelerator": "cpu", "progress": False},
        "latency": False}
METHODS = ["fast", "s2d", "s3d", "firefly", "gradmax", "prune-taylor"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _env() -> dict[str, str]:
    """This environment without the variables of a launcher (each command starts its own processes)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def _runs(out: Path) -> dict[str, dict]:
    return {m: json.loads((out / "runs" / m / "0.006mmacs" / "seed0" / "results.json").read_text()) for m in METHODS}


def test_two_processes_decide_as_one_process_with_the_whole_batch(tmp_path):
    cfg = {**BASE, "seed_options": {"width_mult": 0.125}, "train": {**BASE["train"], "precision": "64-true"},
           "methods": [{"method": "fast", "options": {"analysis_batches": 4}}, "s2d",
                       {"method": "s3d", "options": {"analysis_batches": 4}},
                       {"method": "firefly", "options": {"steps": 4}}, "gradmax", "prune-taylor"],
           "seeds": [0], "target_mmacs": [0.006], "rounds": 2, "seed_epochs": 1, "jobs": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "one")]) == 0
    two = _cli(["compare", "--config", "c.yaml", "--out", "two", *DDP], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("| method |") == 1  # one table: only process 0 reports
    a, b = _runs(tmp_path / "one"), _runs(tmp_path / "two")
    for m in METHODS:
        sa, sb = a[m]["stages"], b[m]["stages"]
        assert [s["widths"] for s in sa] == [s["widths"] for s in sb], m
        assert sb[-1]["train_samples"] == sa[-1]["train_samples"]
        assert b[m]["final"]["test_acc"] == pytest.approx(a[m]["final"]["test_acc"], abs=1e-9), m
        for ga, gb in zip(sa[1:], sb[1:], strict=True):
            if "lambda" in ga.get("growth", {}):
                for layer, st in ga["growth"]["lambda"].items():
                    for k, v in st.items():
                        assert gb["growth"]["lambda"][layer][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (m, k)
        wa = torch.load(tmp_path / "one" / "runs" / m / "0.006mmacs" / "seed0" / "model.pt", weights_only=True)
        wb = torch.load(tmp_path / "two" / "runs" / m / "0.006mmacs" / "seed0" / "model.pt", weights_only=True)
        for k, t in wa["state_dict"].items():
            torch.testing.assert_close(wb["state_dict"][k], t, rtol=1e-4, atol=1e-5, msg=f"{m} {k}")
    assert "lambda" in a["s3d"]["stages"][1]["growth"]


def test_a_killed_two_process_growth_resumes_to_the_same_widths(tmp_path):
    cfg = {**BASE, "backbone_options": {"width_mult": 0.125, "norm": False, "act": "tanh"},
           "growth": {"method": "fast", "rounds": 2, "seed_epochs": 1, "grow_ratio": 0.3, "analysis_batches": 4},
           "train": {**BASE["train"], "epochs": 3}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    # the uninterrupted reference: one process with the doubled batch, which decides as two (test above)
    assert main(["grow", "--config", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "whole")]) == 0
    proc = subprocess.Popen([*CLI, "grow", "--config", "g.yaml", "--out", "killed", *DDP], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "killed" / "checkpoints" / "stage1.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # both processes, mid-way through round 2 (the last)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in ckpt.parent.glob("stage*.pt"))
    assert "stage2.pt" not in done, done
    resumed = _cli(["grow", "--resume", "killed"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert b["config"]["train"]["devices"] == 2
    assert [s["widths"] for s in b["stages"]] == [s["widths"] for s in a["stages"]]
    assert b["final"]["test_acc"] == pytest.approx(a["final"]["test_acc"], abs=1e-9)


def test_sync_batchnorm_grows_a_batch_norm_mobilenet_on_two_processes_as_on_one(tmp_path):
    """``train.sync_batchnorm``: a MobileNet with batch norms grown on 2 processes x 32 samples matches 1 process x 64
    (widths, test accuracy and loss; float64); without it the 2-process seed stage already differs; the files it
    saves hold plain batch norm and load without a process group."""
    from nas_split import load_grown
    from nas_split.sync_batchnorm import SYNCED_TYPES

    train = {**BASE["train"], "precision": "64-true", "sync_batchnorm": True}
    cfg = {"dataset": "digits", "backbone": "test_mobilenetv1", "train": train, "latency": False,
           "growth": {"method": "fast", "rounds": 1, "seed_epochs": 1, "grow_ratio": 0.5, "analysis_batches": 4}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "growth"}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process has (Fabric: CPUs / processes); faster on a busy machine
    try:
        assert main(["grow", "--config", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = _cli(["grow", "--config", "g.yaml", "--out", "two", *DDP], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    plain = _cli(["train", "--config", "t.yaml", "--out", "plain", *DDP, "--set", "train.sync_batchnorm=false"],
                 tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    a, b, c = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two", "plain"))
    assert b["config"]["train"]["sync_batchnorm"] is True and len(b["stages"]) == 2
    assert [s["widths"] for s in b["stages"]] == [s["widths"] for s in a["stages"]]
    assert b["stages"][1]["widths"] != b["stages"][0]["widths"]  # it grew
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sb["test_acc"] == pytest.approx(sa["test_acc"], abs=1e-9)
        assert sb["test_loss"] == pytest.approx(sa["test_loss"], rel=1e-9)
    # the same seed stage without synchronised batch norm: each process normalised its own 32 samples
    assert abs(c["stages"][0]["test_loss"] - a["stages"][0]["test_loss"]) > 1e-4
    one, grown = load_grown(tmp_path / "one" / "checkpoints" / "stage1.pt"), \
        load_grown(tmp_path / "two" / "checkpoints" / "stage1.pt")
    assert not torch.distributed.is_initialized()
    assert not any(isinstance(m, SYNCED_TYPES) for m in grown.modules())
    assert {type(m).__name__ for m in grown.modules()} >= {"BatchNormAct2d"}
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(grown.double().eval()(x), one.double().eval()(x), rtol=1e-8, atol=1e-10)
