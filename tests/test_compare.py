"""``nas-split compare``: the report's numbers, TensorBoard read-back, resume after a kill, refusals."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from nas_split.cli import main
from nas_split.runlog import Tags

ARGS = ["--dataset", "digits", "--backbone", "mobilenetv1_cifar_025", "--set", "backbone_options.width_mult=0.25",
        "--seed-width-mult", "0.125", "--target-mmacs", "3", "--epochs", "1", "--seed-epochs", "1", "--rounds", "1",
        "--no-latency"]


def _compare(out, methods="random,scratch", seeds="0,1", extra=()):
    return ["compare", *ARGS, "--methods", methods, "--seeds", seeds, "--out", str(out), *extra]


METHODS = "random,prune-l1,scratch,random-arch"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "c"
    assert main(_compare(out, METHODS, extra=["--set", "retrain=true"])) == 0
    return out


def _results(out, phase="runs"):
    return {(p.parts[-4], int(p.parts[-2][4:])): json.loads(p.read_text())
            for p in sorted(out.glob(f"{phase}/*/*/seed*/results.json"))}


def _line(table, label):
    return next(ln for ln in table.splitlines() if ln.startswith(f"| {label} |"))


def test_report_numbers_equal_the_runs(finished):
    runs = sorted(finished.glob("runs/*/*/seed*/results.json"))
    assert len(runs) == 8  # 4 methods x 1 target x 2 seeds
    res = {(p.parts[-4], int(p.parts[-2][4:])): json.loads(p.read_text()) for p in runs}
    rows = [r for r in csv.DictReader((finished / "results.csv").open()) if r["phase"] == "search"]
    assert len(rows) == sum(len(r["stages"]) for r in res.values())
    for (label, seed), r in res.items():
        mine = [row for row in rows if row["label"] == label and int(row["seed"]) == seed]
        assert [float(row["test_acc"]) for row in mine] == [s["test_acc"] for s in r["stages"]]
    table = (finished / "table.md").read_text()
    for label in ("random", "prune-l1"):
        accs = [100 * r["final"]["test_acc"] for (lab, _), r in res.items() if lab == label]
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {label} |"))
        assert f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}" in line
        macs = statistics.fmean(r["final"]["mmacs"] for (lab, _), r in res.items() if lab == label)
        assert f"| {macs:.3f} |" in line and abs(macs / 3 - 1) <= 0.05  # matched MACs, no dagger
    # matched epochs: growth trains seed + rounds epochs, pruning full + fine-tune epochs
    assert {r["stages"][-1]["epochs_total"] for r in res.values()} == {2}
    for name in ("pareto.png", "widths.png"):
        assert (finished / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_tags_hparams_figures_load(finished):
    run = EventAccumulator(str(finished / "runs" / "random" / "3mmacs" / "seed0")).Reload()
    tags = run.Tags()
    assert {Tags.TOP1, Tags.MMACS, Tags.ENERGY, Tags.TRAIN_LOSS, Tags.VAL_TOP1} <= set(tags["scalars"])
    hp = run.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method"].string_value == "random" and start.hparams["seed"].number_value == 0
    res = json.loads((finished / "runs" / "random" / "3mmacs" / "seed0" / "results.json").read_text())
    top1 = [e.value for e in run.Scalars(Tags.TOP1)]
    assert top1 == pytest.approx([s["test_acc"] for s in res["stages"]], rel=1e-6)
    summ = EventAccumulator(str(finished / "summary")).Reload()
    assert {"pareto/top1_vs_cost", "widths/per_layer"} <= set(summ.Tags()["images"])
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(
        summ.Tensors("custom_scalars__config__")[0].tensor_proto).item())
    regexes = {r for cat in layout.category for chart in cat.chart for r in chart.multiline.tag}
    assert f"^{Tags.TOP1}$" in regexes and f"^{Tags.MMACS}$" in regexes


def test_kill_halfway_then_rerun_skips_finished_and_gives_the_same_table(tmp_path, finished):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "nas_split.cli", *_compare(out, "random,prune-l1")]  # the fixture's first two
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while len(list(out.glob("runs/*/*/seed*/results.json"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("runs/*/*/seed*/results.json")))
    assert 2 <= done_before < 4
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("skipped (finished before)") == done_before
    assert not list(out.glob("runs/*/*/.*partial*"))

    def accuracy_part(p):  # wall times are measured, so they differ between the two comparisons
        return [ln.split("|")[1:3] for ln in (p / "table.md").read_text().splitlines()
                if ln.startswith(("| random |", "| prune-l1 |"))]

    assert len(accuracy_part(out)) == 2 and accuracy_part(out) == accuracy_part(finished)


def test_retrained_runs_have_the_final_widths_and_the_scratch_recipe(finished):
    search, retrained = _results(finished), _results(finished, "retrain")
    assert set(retrained) == {(m, s) for m in ("random", "prune-l1") for s in (0, 1)}  # scratch-like: no retrain
    for (label, seed), r in retrained.items():
        found = search[(label, seed)]
        scratch = search[("scratch", seed)]
        (st,) = r["stages"]
        assert st["kind"] == "retrain" and st["widths"] == found["stages"][-1]["widths"]
        assert st["epochs"] == scratch["stages"][-1]["epochs"] == found["stages"][-1]["epochs_total"]
        assert r["config"]["train"] == scratch["config"]["train"]
        # fresh weights: the retrained model's first layer is not the searched one's
        a = torch.load(finished / "retrain" / label / "3mmacs" / f"seed{seed}" / "model.pt", weights_only=True)
        b = torch.load(finished / "runs" / label / "3mmacs" / f"seed{seed}" / "model.pt", weights_only=True)
        assert a["sizes"] == b["sizes"]
        assert not torch.equal(a["state_dict"]["conv_stem.weight"], b["state_dict"]["conv_stem.weight"])
    rows = list(csv.DictReader((finished / "results.csv").open()))
    for (label, seed), r in retrained.items():
        (row,) = [x for x in rows if x["phase"] == "retrain" and x["label"] == label and int(x["seed"]) == seed]
        assert float(row["test_acc"]) == r["final"]["test_acc"]
    tb = EventAccumulator(str(finished / "retrain" / "random" / "3mmacs" / "seed0")).Reload()
    assert [e.value for e in tb.Scalars(Tags.TOP1)] == pytest.approx(
        [retrained[("random", 0)]["final"]["test_acc"]], rel=1e-6)


def test_training_macs_are_three_forward_passes_per_sample(finished):
    from nas_split.data import create_dataset

    n = len(create_dataset("digits", seed=0).train)
    per_epoch = n // 64 * 64  # default batch size 64; the last partial batch is dropped
    res = _results(finished)
    for (label, _), r in res.items():
        for st in r["stages"]:
            assert st["train_macs"] == 3 * st["epochs"] * per_epoch * st["cost"]["macs"]
        analysis = sum(st.get("analysis_macs", 0.0) for st in r["stages"])
        assert r["final"]["train_macs"] == pytest.approx(
            sum(3 * st["epochs"] * per_epoch * st["cost"]["macs"] for st in r["stages"]) + analysis, rel=1e-12)
        if label in ("scratch", "random-arch"):
            assert analysis == 0 and len(r["stages"]) == 1
        if label == "prune-l1":
            assert analysis > 0  # the pruner's passes through the full model
    table = (finished / "table.md").read_text()
    for label in ("random", "scratch"):
        tmacs = statistics.fmean(r["final"]["train_macs"] for (lab, _), r in res.items() if lab == label) / 1e12
        assert f"| {tmacs:.3f} |" in _line(table, label)


def test_table_confidence_intervals_equal_scipys(finished):
    from scipy import stats

    search, retrained = _results(finished), _results(finished, "retrain")
    table = (finished / "table.md").read_text()
    for label in ("random", "prune-l1", "random-arch"):
        a = [100 * search[(label, s)]["final"]["test_acc"] for s in (0, 1)]
        b = [100 * search[("scratch", s)]["final"]["test_acc"] for s in (0, 1)]
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        d = statistics.fmean(x - y for x, y in zip(a, b, strict=True))
        cells = [c.strip().strip("*") for c in _line(table, label).split("|")]
        assert cells[3] == f"{d:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"
        if label != "random-arch":
            ra = [100 * retrained[(label, s)]["final"]["test_acc"] for s in (0, 1)]
            ci = stats.ttest_rel(ra, b).confidence_interval(0.95)
            d = statistics.fmean(x - y for x, y in zip(ra, b, strict=True))
            assert cells[5] == f"{d:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"
            assert cells[4].startswith(f"{statistics.fmean(ra):.2f} ± ")
        else:  # trained from scratch: its own retraining
            assert cells[4] == cells[2]
    assert _line(table, "scratch").split("|")[3].strip() == "–"


@pytest.mark.parametrize("extra, message", [
    (["--methods", "fast,prune-l3"], "unknown method 'prune-l3'"),
    (["--target-mmacs", "0.5"], "at target 0.5 MMACs"),
    (["--target-mmacs", "500"], "at target 500 MMACs"),
    (["--backbone", "pointnet_lite"], "takes points inputs"),
    (["--set", "methods=[{method: fast, colour: 1}]"], "does not exist"),
])
def test_bad_config_refused_before_training(tmp_path, capsys, extra, message):
    out = tmp_path / "c"
    assert main(_compare(out, extra=extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_stops_the_workers_and_the_rerun_completes(tmp_path):
    import psutil

    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "nas_split.cli", *_compare(out, "random,scratch", seeds="0,1,2"), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, kids = time.time() + 240, []
    while time.time() < deadline:  # both workers busy on a run
        kids = psutil.Process(proc.pid).children(recursive=True)
        if len(list(out.glob("runs/*/*/.*partial*"))) >= 1 and len(kids) >= 2:
            break
        time.sleep(0.2)
    assert len(kids) >= 2
    proc.send_signal(signal.SIGTERM)  # to the parent only, as a job scheduler or `kill` does
    _, err = proc.communicate(timeout=120)
    # (the multiprocessing resource tracker may add a "leaked semaphore" warning after it)
    assert proc.returncode == 2 and "nas-split: error: interrupted" in err.strip().splitlines()
    gone, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, [p.cmdline() for p in alive]  # no worker, no resource tracker left behind
    assert not list(out.glob("runs/*/*/.*partial*")) and not list(out.glob("**/.*.lock"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("runs/*/*/seed*/results.json"))) == 6


def test_an_in_process_run_gives_back_the_caller_s_thread_count():
    """``run_one`` sets the run's torch threads (float sums depend on them) and restores the caller's count, also
    when the run fails, so that a comparison in a user's process leaves its threads as it found them."""
    from pydantic import ValidationError

    from nas_split.compare import run_one

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(ValidationError):
            run_one({"method": "fast", "no_such_key": 1}, threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
