"""Safe to load, safe to resume, safe to run twice; every bad input answered in one line with nothing written.

CLI cases run as subprocesses (exit code, the one stderr line) and compare the disk before and after by the MD5
of every file, hidden ones included.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nas_split as ns
from nas_split.checkpoints import resume_point
from nas_split.cli import main
from nas_split.errors import NasSplitError, UntrustedFileError
from nas_split.grow_run import resume_config
from nas_split.surgery.export import grown_payload

TINY = ["--dataset", "digits", "--backbone", "test_mobilenetv1", "--epochs", "1", "--no-progress", "--no-latency"]
GROW = [*TINY, "--seed-epochs", "1", "--rounds", "2", "--method", "fast", "--set", "growth.analysis_batches=2",
        "--set", "growth.fast_passes=1"]


def cli(*args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "nas_split.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: md5}`` of every file below ``root`` (hidden ones too)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(p: subprocess.CompletedProcess, message: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("nas-split: error:") and message in lines[0], lines


def widths(run: Path) -> list[dict]:
    return [s["widths"] for s in json.loads((run / "results.json").read_text())["stages"]]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A finished 2-round growth run (seed + 2 rounds) to copy from."""
    out = tmp_path_factory.mktemp("grown") / "run"
    assert main(["grow", *GROW, "--out", str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# 1. Loading runs no code named in a file
def _malicious_payload(marker: Path) -> dict:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    return grown_payload(net, spec={"factory": "os:system", "kwargs": {"command": f"touch {marker}"}})


def test_malicious_factory_runs_nothing_on_load(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_malicious_payload(marker), tmp_path / "evil.pt")
    with pytest.raises(UntrustedFileError, match="never imports or calls code named in a file"):
        ns.load_grown(tmp_path / "evil.pt")
    code = f"import nas_split as ns\ntry:\n    ns.load_grown(r'{tmp_path / 'evil.pt'}')\nexcept Exception as e:\n" \
           "    print(type(e).__name__)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "UntrustedFileError" and not marker.exists()


def test_a_factory_the_caller_allows_still_loads(tmp_path):
    from search_spaces.mlp import MLP

    spec = {"factory": "search_spaces.mlp:MLP", "kwargs": {"num_classes": 3, "in_features": 6, "widths": [5]}}
    net = MLP(3, 6, (5,)).eval()
    ns.save_grown(net, tmp_path / "mlp.pt", spec=spec)
    with pytest.raises(UntrustedFileError, match="factories="):
        ns.load_grown(tmp_path / "mlp.pt")
    back = ns.load_grown(tmp_path / "mlp.pt", factories={"search_spaces.mlp:MLP": MLP}).eval()
    x = torch.randn(4, 6)
    assert torch.equal(back(x), net(x))


def test_resume_of_a_malicious_checkpoint_runs_nothing(grown, tmp_path):
    run = _copy(grown, tmp_path / "run")
    marker = tmp_path / "pwned"
    for ck in (run / "checkpoints").glob("stage*.pt"):
        payload = torch.load(ck, weights_only=True)
        payload["model"]["spec"] = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
        torch.save(payload, ck)
    before = snapshot(tmp_path)
    refused(cli("grow", "--resume", run, "--no-progress"), "never imports or calls code named in a file")
    assert not marker.exists() and snapshot(tmp_path) == before


# 2. Resume finds its own run, wherever it is started from
@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_resume_from_another_directory(grown, tmp_path, how):
    here, elsewhere = tmp_path / "a", tmp_path / "b"
    run = _copy(grown, here / "out")
    (run / "checkpoints" / "stage2.pt").unlink()  # as if killed during round 2
    (elsewhere / "out").mkdir(parents=True)  # an unrelated run directory of the same name where we stand
    (elsewhere / "out" / "results.json").write_text('{"unrelated": true}')
    before = snapshot(elsewhere)
    target = run if how == "absolute" else Path("..") / "a" / "out"
    p = cli("grow", "--resume", target, "--no-progress", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert snapshot(elsewhere) == before
    assert widths(run) == widths(grown) and json.loads((run / "results.json").read_text())["status"] == "done"


# 3. Corrupt state: the newest stage that loads is used (and named), or the resume is refused in one line
@pytest.mark.parametrize("damage", ["truncated", "empty", "no-model"])
def test_resume_skips_a_damaged_checkpoint(grown, tmp_path, damage):
    run = _copy(grown, tmp_path / "run")
    ck = run / "checkpoints" / "stage2.pt"
    if damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:200])
    elif damage == "empty":
        ck.write_bytes(b"")
    else:
        payload = torch.load(ck, weights_only=True)
        del payload["model"]
        torch.save(payload, ck)
    point = resume_point(run)
    assert point.stage == 1 and len(point.skipped) == 1 and point.skipped[0].startswith("stage2.pt")
    assert point.model.conv_stem.out_channels == widths(grown)[1]["conv_stem"]


@pytest.mark.parametrize("results", ["[]", "{}", "not json", ""])
def test_config_of_a_run_with_damaged_results_json(grown, tmp_path, results):
    run = _copy(grown, tmp_path / "run")
    (run / "results.json").write_text(results)
    assert resume_config(run) == json.loads((grown / "results.json").read_text())["config"]


def test_resume_with_damaged_results_json_and_checkpoint(grown, tmp_path):
    run = _copy(grown, tmp_path / "run")
    (run / "results.json").write_text("[]")
    (run / "checkpoints" / "stage2.pt").write_bytes(b"\x00" * 64)
    p = cli("grow", "--resume", run, "--no-progress")
    assert p.returncode == 0, p.stderr
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("nas-split: warning:")]
    assert len(warn) == 1 and "stage2.pt" in warn[0] and "resuming after stage 1" in warn[0]
    assert widths(run) == widths(grown)


def test_resume_refused_when_no_checkpoint_loads(grown, tmp_path):
    run = _copy(grown, tmp_path / "run")
    for ck in (run / "checkpoints").glob("stage*.pt"):
        ck.write_bytes(b"")
    before = snapshot(tmp_path)
    refused(cli("grow", "--resume", run), "nothing to resume")
    assert snapshot(tmp_path) == before


# 4. One run per output
def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "nas_split.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_concurrent_trains_on_one_output(tmp_path):
    out = tmp_path / "run"
    procs = [_popen("train", *TINY, "--epochs", "8", "--out", out) for _ in range(2)]
    ends = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], ends
    loser = ends[[p.returncode for p in procs].index(2)][1].strip().splitlines()
    assert len(loser) == 1 and ("is in use by process" in loser[0] or "already exists" in loser[0]), loser
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "done" and len(res["stages"][0]["history"]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_lock_is_never_seen_without_its_owner(tmp_path, monkeypatch):
    """The moment the lock file exists, a process reading it finds its owner: a lock read empty looks stale and is
    taken over from its live owner (two concurrent trains both ran to the end when the lock was created empty and
    written after)."""
    import socket

    from nas_split import _io

    seen, real_link = [], os.link

    def link(src, dst):
        real_link(src, dst)
        seen.append(_io._lock_owner(Path(dst)))  # what another process would read at this instant

    monkeypatch.setattr(os, "link", link)
    with _io.output_lock(tmp_path / "run"):
        pass
    assert seen == [(os.getpid(), socket.gethostname())]
    assert list(tmp_path.iterdir()) == []  # the private file and the lock are gone


def test_grow_refused_while_another_process_holds_the_output(tmp_path):
    from nas_split._io import output_lock

    out = tmp_path / "run"
    with output_lock(out):  # this test process is the live owner
        refused(cli("grow", *GROW, "--out", out), f"is in use by process {os.getpid()}")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock"]
    assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".run.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    (tmp_path / f".run.partial-{dead.pid}").mkdir()  # what the dead run left behind
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_killed_train_leaves_nothing_after_the_next_run(tmp_path):
    out = tmp_path / "run"
    proc = _popen("train", *TINY, "--epochs", "50", "--out", out)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".run.partial-*/results.json")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert list(tmp_path.glob(".run.partial-*")) and not out.exists()
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_onto_a_file_leaves_nothing_hidden(tmp_path):
    (tmp_path / "run").write_text("a file")
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (tmp_path / "run" / "results.json").is_file()


# 5. The advice after a diverged stage can be followed
def test_nan_in_a_growth_round_then_the_advice(tmp_path, monkeypatch, capsys):
    from nas_split.errors import DivergedError
    from nas_split.training import Trainer

    real, calls = Trainer.fit, {"n": 0}

    def diverge_in_round_1(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise DivergedError("round 1: loss became nan at epoch 0, step 3")
        return real(self, *a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "fit", diverge_in_round_1)
    assert main(["grow", *GROW, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"nas-split grow --resume {out} --lr LR" in err[0]
    monkeypatch.setattr(Trainer, "fit", real)
    assert main(["grow", "--resume", str(out), "--lr", "0.05", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "done" and len(res["stages"]) == 3 and res["config"]["train"]["lr"] == 0.05
    assert main(["grow", "--resume", str(out), "--batch-size", "7"]) == 2
    assert "only train.lr" in capsys.readouterr().err


# 6-12. Bad input: one line, exit 2, nothing written.  One interpreter runs every case (CLI start-up is costly).
_MANY = """
import contextlib, io, json, sys
from nas_split.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    print(json.dumps([code, err.getvalue()]))
"""


def cli_many(cases: list[list[str]]) -> list[tuple[int, str]]:
    p = subprocess.run([sys.executable, "-c", _MANY, json.dumps(cases)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return [tuple(json.loads(line)) for line in p.stdout.strip().splitlines()]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    import gzip
    import struct

    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fashion_dir(root: Path, damage: str) -> Path:
    data = root / f"fm-{damage}"
    data.mkdir()
    for prefix, n in (("train", 200), ("t10k", 40)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    target = data / "train-images-idx3-ubyte.gz"
    if damage == "not-gzip":
        target.write_bytes(b"plain text, not gzip")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        _write_idx(data / "train-labels-idx1-ubyte.gz", np.arange(100) % 10)
    return data


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create entries in (root ignores modes, so root gets a read-only sysfs)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        return ro
    ro = Path("/sys/nas-split-unwritable")
    with pytest.raises(OSError):
        ro.mkdir()
    return ro


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    fm = {d: _fashion_dir(inputs, d) for d in ("not-gzip", "truncated", "label-count")}
    ro = _unwritable_dir(inputs)
    out = str(tmp_path / "work" / "run")
    cases = [
        (["train", "--set", "dataset_options.bogus=1"], "dataset_options.bogus: dataset 'digits' takes no such"),
        (["compare", "--methods", "scratch", "--target-mmacs", "1", "--set", "dataset_options.bogus=1"],
         "dataset_options.bogus"),
        (["train", "--set", "dataset_options.val_fraction=abc"], "dataset_options.val_fraction='abc'"),
        (["train", "--set", "dataset_options.val_fraction=2"], "must lie strictly between 0 and 1"),
        (["train", "--set", "train.accelerator=gpu"], "train.accelerator='gpu'"),
        (["train", "--set", "train.accelerator=bogus"], "invalid accelerator name"),
        (["grow", "--set", "train.accelerator=bogus"], "invalid accelerator name"),
        (["grow", "--set", "train.precision=bogus"], "precision='bogus'"),
        (["train", "--dataset", "fashion-mnist", "--data-dir", str(fm["not-gzip"])], "cannot be read as gzip"),
        (["train", "--dataset", "fashion-mnist", "--data-dir", str(fm["truncated"])], "cannot be read as gzip"),
        (["train", "--dataset", "fashion-mnist", "--data-dir", str(fm["label-count"])],
         "holds 200 images of shape (28, 28) but train-labels-idx1-ubyte.gz holds 100 labels"),
        (["train", "--out", str(ro / "run")], "cannot write output"),
        (["grow", *GROW[len(TINY):], "--out", str(ro / "run")], "cannot write output"),
        (["run", "--method", "scratch", "--target-mmacs", "1e9"], "outside what width multipliers"),
        (["run", "--method", "scratch", "--target-mmacs", "0.001"], "outside what width multipliers"),
        (["run", "--method", "scratch", "--target-mmacs", "inf"], "config value target_mmacs='inf'"),
        (["compare", "--methods", "scratch", "--target-mmacs", "1", "--seeds", "0,0"], "seed 0 is listed twice"),
        (["train", "--set", "backbone_options.width_mult=-1"], "width_mult must be > 0"),
        (["train", "--data-dir", str(inputs)], "dataset 'digits' reads no files"),
    ]
    before = snapshot(tmp_path)
    answers = cli_many([[argv[0], *TINY, "--out", out, *argv[1:]] for argv, _ in cases])
    for (argv, message), (code, err) in zip(cases, answers, strict=True):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("nas-split: error:"), (argv, err)
        assert message in lines[0], (argv, lines[0])
    assert snapshot(tmp_path) == before and not (tmp_path / "work").exists()


def test_nan_in_train_and_in_the_seed_stage_write_nothing(tmp_path):
    lr = ["--lr", "1e30", "--set", "train.nesterov=false"]
    (code_t, err_t), (code_g, err_g) = cli_many([["train", *TINY, *lr, "--out", str(tmp_path / "t")],
                                                 ["grow", *GROW, *lr, "--out", str(tmp_path / "g")]])
    assert code_t == 2 and len(err_t.strip().splitlines()) == 1 and "nothing was written" in err_t
    assert code_g == 2 and len(err_g.strip().splitlines()) == 1 and "nothing was kept" in err_g
    assert list(tmp_path.iterdir()) == []


def test_errors_share_one_base_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    from nas_split.config import ConfigError
    from nas_split.data import DataFormatError, DataNotFoundError, UnknownDatasetError
    from nas_split.experiment import BackboneMismatchError
    from nas_split.methods import UnknownMethodError

    for err in (ConfigError, DataFormatError, DataNotFoundError, UnknownDatasetError, BackboneMismatchError,
                UnknownMethodError, ns.NotGrowableError, UntrustedFileError):
        assert issubclass(err, NasSplitError)
    code = ("import nas_split.experiment as e\n"
            "def boom(*a, **k):\n    raise ValueError('an internal bug')\n"
            "e.prepare = boom\nimport nas_split.cli as c, sys\n"
            f"sys.exit(c.main(['train', '--dataset', 'digits', '--out', r'{tmp_path / 'run'}']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ValueError: an internal bug" in p.stderr


# issue 28: run files of the wrong shape, stage states that are garbage or name code
def test_malformed_run_files_are_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["run", "--method", "scratch", "--dataset", "digits", "--backbone", "mlp", "--epochs", "1",
                 "--target-mmacs", "0.01", "--no-progress", "--no-latency", "--out", str(run)]) == 0
    good = json.loads((run / "results.json").read_text())
    marker = tmp_path / "PWNED"

    class _Code:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def results(change):
        def write(d: Path) -> Path:
            res = json.loads(json.dumps(good))
            change(res)
            (d / "results.json").write_text(json.dumps(res))
            return d
        return write

    def state(content):
        def write(d: Path) -> Path:
            shutil.copy(d / "model.pt", d / "m.pt")
            if isinstance(content, bytes):
                (d / "m.state.pt").write_bytes(content)
            else:
                torch.save(content, d / "m.state.pt")
            return d / "m.pt"
        return write

    cases = {
        "stages-of-empty-dicts": (results(lambda r: r.update(stages=[{}])), "stages.0.stage: Field required"),
        "stages-a-string": (results(lambda r: r.update(stages="abc")), "stages: Input should be a valid list"),
        "train-a-string": (results(lambda r: r["config"].update(train="x")), "config.train is not a mapping"),
        "epochs-a-string": (results(lambda r: r["stages"][0].update(epochs_total="x")), "stages.0.epochs_total"),
        "results-a-list": (lambda d: (d / "results.json").write_text("[1, 2]") and d, "(root): Input should be"),
        "state-garbage": (state(b"garbage"), "not a file torch.save wrote"),
        "state-naming-code": (state({"run": _Code()}), "objects other than tensors and plain data"),
        "state-foreign": (state({"weights": torch.zeros(2)}), "no 'run' settings"),
    }
    for name, (make, words) in cases.items():
        d = shutil.copytree(run, tmp_path / name)
        source = make(d)
        code = main(["retrain", str(source), "--epochs", "1", "--no-progress", "--no-latency",
                     "--out", str(tmp_path / f"{name}-out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (name, err)
        assert not (tmp_path / f"{name}-out").exists(), name
    assert not marker.exists()


def test_multi_node_without_a_master_fails_within_the_timeout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK",
                                                            "LOCAL_RANK", "WORLD_SIZE")}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "nas_split.cli", "grow", *TINY, "--set", "train.num_nodes=2",
                        "--set", "train.strategy=ddp", "--set", "train.accelerator=cpu",
                        "--set", "train.init_timeout=2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - t0
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("nas-split: error:"), p.stderr
    assert "did not form within train.init_timeout=2 s" in last and "MASTER_ADDR" in last
    assert took < 60  # torch's default is 30 minutes; 2 s + start-up here
    assert not (tmp_path / "run").exists()
