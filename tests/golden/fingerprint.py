"""Fingerprints of the records ``grow``, ``run``, ``compare``, ``nni`` and ``retrain`` write for one tiny digits
config, so a refactor that should not change behaviour can be checked against a stored run of earlier code.

``python tests/golden/fingerprint.py OUT.json`` writes the fingerprints (``tests/golden/digits_records.json`` was
written by the code of commit 080d774, before the nni/, growth/ and cost/ packages); ``tests/test_golden.py``
recomputes them and compares.  Only the CLI is used, so module moves do not touch this file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

COMMON = ["--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--width-mult", "0.125", "--epochs", "1",
          "--no-progress", "--no-latency", "--seed", "0"]
STAGES = [*COMMON, "--rounds", "2", "--seed-epochs", "1"]
GROW = [*STAGES, "--set", "growth.analysis_batches=2"]
RUN = [*STAGES, "--set", "method_options={analysis_batches: 2}", "--set", "seed_options={width_mult: 0.125}"]


def _stage(s: dict) -> dict:
    """What a stage must keep across a refactor: its kind, epochs, widths, MACs, params and accuracy."""
    return {"stage": s["stage"], "kind": s["kind"], "epochs": s["epochs"], "widths": s["widths"],
            "macs": s["cost"]["macs"], "params": s["cost"]["params"], "test_acc": round(s["test_acc"], 6),
            "train_macs": s.get("train_macs", 0.0), "new_neurons": (s.get("growth") or {}).get("new_neurons", 0)}


def _results(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("results.json")):
        data = json.loads(path.read_text())
        out[str(path.relative_to(root))] = {"method": data.get("method"), "stages": [_stage(s) for s in data["stages"]]}
    return out


def fingerprints(work: Path) -> dict:
    """Run the five commands under ``work`` and return their fingerprints."""
    from nas_split.cli import main

    def call(*argv: str) -> str:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(list(argv))
        if code != 0:
            raise RuntimeError(f"nas-split {' '.join(argv)} exited {code}")
        return buf.getvalue()

    fp: dict = {}
    call("grow", *GROW, "--method", "fast", "--out", str(work / "grow"))
    fp["grow"] = _results(work / "grow")
    call("run", *RUN, "--method", "s3d", "--out", str(work / "run"))
    fp["run"] = _results(work / "run")
    cfg = work / "compare.yaml"
    cfg.write_text("dataset: digits\nbackbone: mobilenetv1_cifar_025\nbackbone_options: {width_mult: 0.25}\n"
                   "seed_options: {width_mult: 0.125}\nmethods: [fast, prune-l1, scratch]\nseeds: [0]\n"
                   "target_mmacs: [3.0]\nrounds: 2\nseed_epochs: 1\ntrain: {epochs: 1, progress: false}\n"
                   "latency: false\nretrain: true\n")
    call("compare", "--config", str(cfg), "--out", str(work / "compare"))
    fp["compare"] = _results(work / "compare")
    printed = call("nni", *GROW, "--method", "s3d", "--out", str(work / "nni"))
    fp["nni"] = [line.split() for line in printed.splitlines() if line.split() and line.split()[0].isdigit()]
    call("retrain", str(work / "grow"), "--out", str(work / "retrain"), "--no-progress", "--no-latency")
    fp["retrain"] = _results(work / "retrain")
    return fp


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HOME"] = tmp  # NNI writes its manifest under $HOME
        Path(sys.argv[1]).write_text(json.dumps(fingerprints(Path(tmp)), indent=1, sort_keys=True) + "\n")
